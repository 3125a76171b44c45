"""The spot agent: turns a cloud's reclaim notice into a Ray drain of its own node.

Ray learns that a node is about to go only when something drains it; on a real cloud nothing does that for a spot VM
(its autoscaler drains only nodes it terminates itself). This agent runs once per worker node, polls the provider's
notice endpoint and, on a reclaim notice, drains its own node with reason preemption and the notice's deadline. From
there Ray does the rest: Ray Train marks the node's workers (just-in-time checkpoint, restart on the nodes left) and
Serve starts replacement replicas elsewhere and lets the old ones finish.

Sources (one or several per agent):
- aws: IMDSv2. A session token (PUT /latest/api/token), then `spot/instance-action` (404 until a stop/terminate is
  scheduled, then {"action", "time"}: about two minutes) and `events/recommendations/rebalance` (an early warning
  without a deadline: logged, or drained with --on-rebalance drain).
- gcp: the metadata server with `Metadata-Flavor: Google`: `instance/preempted` (TRUE: about 30 s left) and
  `instance/maintenance-event` (TERMINATE_ON_HOST_MAINTENANCE drains; a live migration is only logged).
- azure: Scheduled Events (`Metadata: true`): a `Preempt` or `Terminate` event for this VM, deadline `NotBefore`.
- kubernetes: this pod's node through the API server: cordoned (spec.unschedulable), a deletion timestamp, a
  termination taint (cluster autoscaler, Karpenter, GKE), or the node gone.

The endpoints are configurable (tests run real HTTP servers on loopback that speak each protocol). Failures to reach
an endpoint are logged and retried; they never stop the agent. The agent exits 0 once its drain is accepted."""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

log = logging.getLogger("moe_platform.spot_agent")

PROVIDERS = ("aws", "gcp", "azure", "kubernetes")
DEFAULT_ENDPOINTS = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal",
                     "azure": "http://169.254.169.254"}
GCP_PREEMPT_S = 30.0  # what GCP guarantees between the preempted flag and the stop
GCP_MAINTENANCE_S = 60.0  # TERMINATE_ON_HOST_MAINTENANCE: at least 60 s notice
K8S_SA = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# taints that mean "this node is about to be removed" (cluster autoscaler, Karpenter, GKE's spot handling, kubelet)
K8S_TERMINATION_TAINTS = frozenset({"ToBeDeletedByClusterAutoscaler", "karpenter.sh/disrupted",
                                    "karpenter.sh/disruption", "cloud.google.com/impending-node-termination",
                                    "node.kubernetes.io/out-of-service"})


@dataclass(frozen=True)
class Notice:
    provider: str
    kind: str  # terminate / stop / preempted / maintenance / cordoned / deleted / rebalance / migrate
    deadline: float  # Unix seconds; 0: none given
    detail: str
    drain: bool  # whether this notice drains the node

    def describe(self) -> str:
        left = f", {self.deadline - time.time():.0f} s left" if self.deadline else ""
        return f"{self.provider} {self.kind} notice ({self.detail}{left})"


class NoticeSourceError(RuntimeError):
    """An endpoint that could not be read, or answered something that is not its protocol."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _request(url: str, method: str = "GET", headers: dict[str, str] | None = None, timeout_s: float = 2.0,
             context: ssl.SSLContext | None = None) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers); an HTTP error status is returned, not raised. Redirects are not followed: a metadata
    endpoint never redirects, and following one could send a token elsewhere."""
    handlers: list = [_NoRedirect(), urllib.request.ProxyHandler({})]  # metadata is never reached through a proxy
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=b"" if method == "PUT" else None)
    try:
        with opener.open(req, timeout=timeout_s) as r:
            return r.status, r.read(1 << 20), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(1 << 20), dict(e.headers or {})
    except (urllib.error.URLError, OSError) as e:
        raise NoticeSourceError(f"{method} {url}: {getattr(e, 'reason', e)}") from e


def _json(body: bytes, url: str) -> object:
    try:
        return json.loads(body)
    except ValueError as e:
        raise NoticeSourceError(f"{url} answered something that is not JSON: {body[:200]!r}") from e


def _iso_time(value: str, url: str) -> float:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError) as e:
        raise NoticeSourceError(f"{url}: not an ISO 8601 time: {value!r}") from e


class AwsSource:
    """EC2 instance metadata, IMDSv2 (session tokens; IMDSv1 may be switched off on the instance)."""

    name = "aws"
    TOKEN_TTL_S = 21600

    def __init__(self, endpoint: str = DEFAULT_ENDPOINTS["aws"], drain_on_rebalance: bool = False,
                 rebalance_deadline_s: float = 120.0):
        self.endpoint = endpoint.rstrip("/")
        self.drain_on_rebalance = drain_on_rebalance
        self.rebalance_deadline_s = rebalance_deadline_s
        self._token: str | None = None
        self._token_until = 0.0

    def _get(self, path: str) -> tuple[int, bytes]:
        for attempt in (0, 1):
            if self._token is None or time.monotonic() > self._token_until:
                url = f"{self.endpoint}/latest/api/token"
                status, body, _ = _request(url, "PUT", {"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL_S)})
                if status != 200 or not body:
                    raise NoticeSourceError(f"PUT {url}: IMDSv2 token refused (HTTP {status})")
                self._token, self._token_until = body.decode().strip(), time.monotonic() + self.TOKEN_TTL_S / 2
            status, body, _ = _request(f"{self.endpoint}{path}", headers={"X-aws-ec2-metadata-token": self._token})
            if status != 401 or attempt:
                return status, body
            self._token = None  # expired or revoked: one fresh token, then give up for this poll
        return status, body

    def poll(self) -> Notice | None:
        path = "/latest/meta-data/spot/instance-action"
        status, body = self._get(path)
        if status == 200:
            doc = _json(body, path)
            if not isinstance(doc, dict) or "action" not in doc or "time" not in doc:
                raise NoticeSourceError(f"{path}: expected {{'action', 'time'}}, got {body[:200]!r}")
            return Notice("aws", str(doc["action"]), _iso_time(doc["time"], path), f"spot {doc['action']} at "
                          f"{doc['time']}", drain=True)
        if status != 404:
            raise NoticeSourceError(f"{path}: HTTP {status}")
        path = "/latest/meta-data/events/recommendations/rebalance"
        status, body = self._get(path)
        if status == 200:
            doc = _json(body, path)
            when = doc.get("noticeTime", "?") if isinstance(doc, dict) else "?"
            deadline = time.time() + self.rebalance_deadline_s if self.drain_on_rebalance else 0.0
            return Notice("aws", "rebalance", deadline, f"rebalance recommendation at {when}",
                          drain=self.drain_on_rebalance)
        if status != 404:
            raise NoticeSourceError(f"{path}: HTTP {status}")
        return None


class GcpSource:
    """The GCE metadata server; every answer must carry `Metadata-Flavor: Google` (anything else is not it)."""

    name = "gcp"

    def __init__(self, endpoint: str = DEFAULT_ENDPOINTS["gcp"]):
        self.endpoint = endpoint.rstrip("/")

    def _get(self, key: str) -> str:
        url = f"{self.endpoint}/computeMetadata/v1/instance/{key}"
        status, body, headers = _request(url, headers={"Metadata-Flavor": "Google"})
        if {k.lower(): v for k, v in headers.items()}.get("metadata-flavor") != "Google":
            raise NoticeSourceError(f"{url}: the answer lacks Metadata-Flavor: Google, so it is not GCE metadata")
        if status != 200:
            raise NoticeSourceError(f"{url}: HTTP {status}")
        return body.decode().strip()

    def poll(self) -> Notice | None:
        if self._get("preempted").upper() == "TRUE":
            return Notice("gcp", "preempted", time.time() + GCP_PREEMPT_S, "instance/preempted is TRUE", drain=True)
        event = self._get("maintenance-event")
        if event.startswith("TERMINATE"):
            return Notice("gcp", "maintenance", time.time() + GCP_MAINTENANCE_S, event, drain=True)
        if event not in ("", "NONE"):
            return Notice("gcp", "migrate", 0.0, event, drain=False)  # live migration: the VM stays
        return None


class AzureSource:
    """Azure Scheduled Events (`Metadata: true`): a Preempt or Terminate event naming this VM."""

    name = "azure"
    API = "2020-07-01"

    def __init__(self, endpoint: str = DEFAULT_ENDPOINTS["azure"]):
        self.endpoint = endpoint.rstrip("/")
        self._vm: str | None = None

    def _get(self, path: str) -> bytes:
        url = f"{self.endpoint}{path}"
        status, body, _ = _request(url, headers={"Metadata": "true"})
        if status != 200:
            raise NoticeSourceError(f"{url}: HTTP {status}")
        return body

    def poll(self) -> Notice | None:
        if self._vm is None:
            self._vm = self._get("/metadata/instance/compute/name?api-version=2021-02-01&format=text").decode().strip()
        path = f"/metadata/scheduledevents?api-version={self.API}"
        doc = _json(self._get(path), path)
        events = doc.get("Events") if isinstance(doc, dict) else None
        if not isinstance(events, list):
            raise NoticeSourceError(f"{path}: expected {{'Events': [...]}}, got {str(doc)[:200]}")
        for event in events:
            if not isinstance(event, dict) or event.get("EventType") not in ("Preempt", "Terminate"):
                continue
            if self._vm not in (event.get("Resources") or []):
                continue  # an event for another VM of the scale set
            not_before = event.get("NotBefore") or ""
            try:
                deadline = parsedate_to_datetime(not_before).timestamp() if not_before else time.time()
            except (TypeError, ValueError) as e:
                raise NoticeSourceError(f"{path}: NotBefore is not an HTTP date: {not_before!r}") from e
            return Notice("azure", event["EventType"].lower(), deadline,
                          f"{event['EventType']} {event.get('EventId', '?')} not before {not_before or 'now'}",
                          drain=True)
        return None


class KubernetesSource:
    """This pod's node, read from the API server with the pod's service account (it needs `get` on nodes)."""

    name = "kubernetes"

    def __init__(self, node: str | None = None, api: str | None = None, token: str | None = None,
                 ca_file: str | None = None, grace_s: float = 30.0):
        self.node = node or os.environ.get("NODE_NAME") or ""
        if not self.node:
            raise ValueError("kubernetes: no node name; pass --k8s-node or set NODE_NAME (the downward API's "
                             "spec.nodeName)")
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        self.api = (api or (f"https://{host}:{port}" if host else "https://kubernetes.default.svc")).rstrip("/")
        if token is None and (K8S_SA / "token").is_file():
            token = (K8S_SA / "token").read_text().strip()
        self.token = token
        ca_file = ca_file or (str(K8S_SA / "ca.crt") if (K8S_SA / "ca.crt").is_file() else None)
        self.context = ssl.create_default_context(cafile=ca_file) if self.api.startswith("https") else None
        self.grace_s = grace_s

    def poll(self) -> Notice | None:
        url = f"{self.api}/api/v1/nodes/{self.node}"
        headers = {"Accept": "application/json"} | ({"Authorization": f"Bearer {self.token}"} if self.token else {})
        status, body, _ = _request(url, headers=headers, context=self.context)
        deadline = time.time() + self.grace_s
        if status == 404:
            return Notice("kubernetes", "deleted", deadline, f"node {self.node} no longer exists", drain=True)
        if status != 200:
            raise NoticeSourceError(f"GET {url}: HTTP {status} {body[:200]!r}")
        node = _json(body, url)
        if not isinstance(node, dict):
            raise NoticeSourceError(f"GET {url}: not a Node object")
        if (node.get("metadata") or {}).get("deletionTimestamp"):
            return Notice("kubernetes", "deleted", deadline, f"node {self.node} is being deleted", drain=True)
        spec = node.get("spec") or {}
        taints = {t.get("key") for t in spec.get("taints") or [] if isinstance(t, dict)} & K8S_TERMINATION_TAINTS
        if taints:
            return Notice("kubernetes", "tainted", deadline, f"node {self.node} has taint {sorted(taints)[0]}",
                          drain=True)
        if spec.get("unschedulable"):
            return Notice("kubernetes", "cordoned", deadline, f"node {self.node} is cordoned", drain=True)
        return None


# -- the drain -------------------------------------------------------------------------------------------------------


def own_node_id(address: str, node_id: str | None = None, ip: str | None = None) -> str:
    """This machine's Ray node: `node_id` when given (checked to be alive), else the one alive node whose IP is
    this machine's."""
    import ray.util

    from moe_platform import ray_compat

    nodes = ray_compat.alive_nodes(address)
    if node_id:
        if not any(n.node_id == node_id for n in nodes):
            raise ValueError(f"no alive Ray node {node_id} in the cluster at {address}")
        return node_id
    ip = ip or ray.util.get_node_ip_address()
    mine = [n for n in nodes if n.ip == ip]
    if len(mine) != 1:
        raise ValueError(f"{len(mine)} alive Ray nodes have this machine's IP {ip} (cluster at {address}); pass "
                         f"--node-id (one of {[n.node_id for n in mine]})" if mine else
                         f"no alive Ray node has this machine's IP {ip} in the cluster at {address}: start the "
                         f"agent after `ray start`, or pass --node-id")
    return mine[0].node_id


class RayDrainer:
    def __init__(self, address: str, node_id: str | None = None):
        self.address, self.node_id = address, node_id

    def __call__(self, notice: Notice) -> tuple[bool, str]:
        from moe_platform import ray_compat

        node = own_node_id(self.address, self.node_id)
        deadline = notice.deadline or time.time() + 120.0
        deadline_ms = int(max(deadline, time.time() + 1.0) * 1000)  # a deadline already past: drain now
        accepted, why = ray_compat.drain_node_for_preemption(self.address, node, notice.describe(), deadline_ms)
        return accepted, f"node {node}: {why}" if why else f"node {node}"


def run_agent(sources: Sequence, drain: Callable[[Notice], tuple[bool, str]], interval_s: float = 1.0,
              max_polls: int | None = None, sleep: Callable[[float], None] = time.sleep) -> Notice | None:
    """Poll every source each `interval_s` until one gives a notice that drains the node and the drain is accepted;
    returns that notice (None after `max_polls` rounds without one). Notices that do not drain are logged once each;
    unreadable endpoints are logged (the first time, then every 60th) and polled again."""
    seen: set[tuple[str, str, str]] = set()
    failures: dict[str, int] = {}
    polls = 0
    while max_polls is None or polls < max_polls:
        polls += 1
        for source in sources:
            try:
                notice = source.poll()
            except NoticeSourceError as e:
                failures[source.name] = failures.get(source.name, 0) + 1
                if failures[source.name] % 60 == 1:
                    log.warning("spot agent: %s notices unreadable (%d times so far): %s", source.name,
                                failures[source.name], e)
                continue
            if notice is None:
                continue
            if not notice.drain:
                if (notice.provider, notice.kind, notice.detail) not in seen:
                    seen.add((notice.provider, notice.kind, notice.detail))
                    log.warning("spot agent: %s; not draining for it", notice.describe())
                continue
            log.warning("spot agent: %s; draining this node", notice.describe())
            try:
                accepted, detail = drain(notice)
            except Exception as e:  # the GCS may be briefly unreachable: try again next round, before the deadline
                log.warning("spot agent: drain failed, retrying: %s", e)
                continue
            if accepted:
                log.warning("spot agent: drain accepted (%s)", detail)
                return notice
            log.warning("spot agent: drain refused (%s), retrying", detail)
        sleep(interval_s)
    return None


def build_sources(providers: Sequence[str], metadata_url: str | None = None, on_rebalance: str = "log",
                  k8s_node: str | None = None, k8s_api: str | None = None, k8s_grace_s: float = 30.0) -> list:
    if not providers:
        raise ValueError(f"no --provider given; choose from {list(PROVIDERS)}")
    sources = []
    for p in providers:
        if p not in PROVIDERS:
            raise ValueError(f"unknown --provider {p!r}; choose from {list(PROVIDERS)}")
        if p == "aws":
            sources.append(AwsSource(metadata_url or DEFAULT_ENDPOINTS["aws"],
                                     drain_on_rebalance=on_rebalance == "drain"))
        elif p == "gcp":
            sources.append(GcpSource(metadata_url or DEFAULT_ENDPOINTS["gcp"]))
        elif p == "azure":
            sources.append(AzureSource(metadata_url or DEFAULT_ENDPOINTS["azure"]))
        else:
            sources.append(KubernetesSource(k8s_node, k8s_api, grace_s=k8s_grace_s))
    return sources
