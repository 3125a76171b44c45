"""The spot agent against real HTTP servers on loopback that speak each provider's notice protocol (tinyrun.FakeCloud):
nothing before a notice, the notice (with its deadline) after, the protocol's own handshake (IMDSv2 tokens, the GCE and
Azure headers, the Kubernetes bearer token), and an agent that keeps polling through unreachable endpoints and a
refused drain. The drain through Ray itself, and what training does with it: tests/integration/test_ray_preemption.py.
"""

from __future__ import annotations

import subprocess
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from moe_platform.cluster.spot_agent import (
    AwsSource,
    AzureSource,
    GcpSource,
    KubernetesSource,
    Notice,
    NoticeSourceError,
    build_sources,
    run_agent,
)
from tinyrun import BIN, FakeCloud, free_port


@pytest.fixture(scope="module")
def cloud():
    with FakeCloud() as c:
        yield c


@pytest.fixture(autouse=True)
def fresh_state(cloud):
    saved = {k: v for k, v in cloud.state.items()}
    yield
    cloud.state.clear()
    cloud.state.update(saved)
    cloud.requests.clear()


def in_seconds(s: float) -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=s)


def test_aws_imdsv2_token_flow_and_instance_action(cloud):
    source = AwsSource(cloud.url)
    assert source.poll() is None  # 404 on both documents: no notice
    put, get = cloud.requests[0], cloud.requests[1]
    assert put[0] == "PUT" and put[1] == "/latest/api/token" and put[2]["x-aws-ec2-metadata-token-ttl-seconds"]
    assert get[2]["x-aws-ec2-metadata-token"] in cloud.aws_tokens
    when = in_seconds(120)
    cloud.state["aws_action"] = {"action": "terminate", "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
    notice = source.poll()
    assert notice.provider == "aws" and notice.kind == "terminate" and notice.drain
    assert notice.deadline == when.timestamp()
    assert sum(1 for r in cloud.requests if r[0] == "PUT") == 1  # the session token is reused

    cloud.aws_tokens.clear()  # the token expired or was revoked: 401, one fresh token, the same answer
    assert source.poll() == notice
    assert sum(1 for r in cloud.requests if r[0] == "PUT") == 2


def test_aws_rebalance_recommendation_is_logged_unless_asked_to_drain(cloud):
    cloud.state["aws_rebalance"] = {"noticeTime": "2026-12-02T19:40:00Z"}
    notice = AwsSource(cloud.url).poll()
    assert notice.kind == "rebalance" and not notice.drain and notice.deadline == 0
    eager = AwsSource(cloud.url, drain_on_rebalance=True).poll()
    assert eager.drain and 110 < eager.deadline - time.time() <= 120


def test_gcp_preempted_and_maintenance_events(cloud):
    source = GcpSource(cloud.url)
    assert source.poll() is None
    assert all(r[2].get("metadata-flavor") == "Google" for r in cloud.requests)
    cloud.state["gcp_maintenance"] = "MIGRATE_ON_HOST_MAINTENANCE"
    migrate = source.poll()
    assert migrate.kind == "migrate" and not migrate.drain  # a live migration keeps the VM
    cloud.state["gcp_maintenance"] = "TERMINATE_ON_HOST_MAINTENANCE"
    assert source.poll().drain
    cloud.state["gcp_preempted"] = "TRUE"
    notice = source.poll()
    assert notice.kind == "preempted" and notice.drain and 25 < notice.deadline - time.time() <= 30


def test_gcp_answers_without_the_google_header_are_not_trusted(cloud):
    # the AWS part of the server answers this path with a 401 and no Metadata-Flavor header: not GCE metadata
    with pytest.raises(NoticeSourceError, match="Metadata-Flavor"):
        GcpSource(cloud.url + "/latest").poll()


def test_azure_preempt_event_for_this_vm(cloud):
    source = AzureSource(cloud.url)
    assert source.poll() is None
    assert all(r[2].get("metadata") == "true" for r in cloud.requests)
    not_before = in_seconds(30)
    other = {"EventId": "A", "EventType": "Preempt", "ResourceType": "VirtualMachine", "Resources": ["vm-3"],
             "EventStatus": "Scheduled", "NotBefore": format_datetime(not_before, usegmt=True)}
    freeze = {**other, "EventId": "B", "EventType": "Freeze", "Resources": ["vm-7"]}
    cloud.state["azure_events"] = [other, freeze]
    assert source.poll() is None  # another VM's preemption, and a freeze of this one, do not drain it
    cloud.state["azure_events"] = [other, freeze, {**other, "EventId": "C", "Resources": ["vm-7"]}]
    notice = source.poll()
    assert notice.kind == "preempt" and notice.drain and "C" in notice.detail
    assert notice.deadline == not_before.timestamp()


def test_kubernetes_cordon_taint_deletion_and_removal(cloud):
    source = KubernetesSource(node="node-a", api=cloud.url, token=FakeCloud.K8S_TOKEN, grace_s=20)
    assert source.poll() is None
    for spec, meta, kind in [({"unschedulable": True}, {}, "cordoned"),
                             ({"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}, {},
                              "tainted"),
                             ({}, {"deletionTimestamp": "2026-12-02T19:40:00Z"}, "deleted")]:
        cloud.state["k8s_node"] = {"metadata": {"name": "node-a", **meta}, "spec": spec}
        notice = source.poll()
        assert notice.kind == kind and notice.drain and 15 < notice.deadline - time.time() <= 20, (kind, notice)
    cloud.state["k8s_node"] = None
    assert source.poll().kind == "deleted"
    with pytest.raises(NoticeSourceError, match="401"):
        KubernetesSource(node="node-a", api=cloud.url, token="wrong").poll()
    with pytest.raises(ValueError, match="NODE_NAME"):
        KubernetesSource(node="", api=cloud.url)


def test_agent_polls_through_failures_and_retries_a_refused_drain(cloud):
    """One agent on all four sources plus an endpoint where nothing listens: unreadable sources are logged and polled
    again; the first notice that drains is drained, and a refused drain is asked again next round."""
    dead = AwsSource(f"http://127.0.0.1:{free_port()}")
    sources = [dead, *build_sources(["gcp", "azure"], cloud.url),
               KubernetesSource(node="node-a", api=cloud.url, token=FakeCloud.K8S_TOKEN)]
    drains: list[Notice] = []

    def drain(notice):
        drains.append(notice)
        return len(drains) > 1, "refused once"

    assert run_agent(sources, drain, interval_s=0, max_polls=3) is None and not drains
    cloud.state["gcp_maintenance"] = "MIGRATE_ON_HOST_MAINTENANCE"  # logged, not drained
    rounds = iter(range(100))

    def step(_):
        if next(rounds) == 2:
            cloud.state["azure_events"] = [{"EventId": "P", "EventType": "Preempt", "Resources": ["vm-7"],
                                            "NotBefore": ""}]

    notice = run_agent(sources, drain, interval_s=0, max_polls=10, sleep=step)
    assert notice.provider == "azure" and notice.kind == "preempt" and len(drains) == 2
    assert [d.detail for d in drains] == [notice.detail] * 2 and abs(notice.deadline - time.time()) < 5


def test_cli_refuses_bad_options():
    def run(*args):
        return subprocess.run([str(BIN / "moe-platform"), "spot-agent", *args], capture_output=True, text=True,
                              timeout=120)

    r = run("--provider", "ibm")
    assert r.returncode == 2 and "invalid choice: 'ibm'" in r.stderr
    r = run("--provider", "kubernetes", "--k8s-api", "http://127.0.0.1:1")
    assert r.returncode == 2 and "NODE_NAME" in r.stderr, r.stderr
    r = run("--provider", "aws", "--address", f"127.0.0.1:{free_port()}", "--startup-timeout-s", "0")
    assert r.returncode == 2 and "cannot find this machine's Ray node" in r.stderr, r.stderr
