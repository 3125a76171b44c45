"""The controller of a Serve app: one detached Ray actor per app holding its `Rollout` state and its app-wide
metrics (`AppMetrics`, served at GET /metrics under vLLM's names).

Replicas create it on first use (`controller(app, ...)`, idempotent) and sync with it every metrics interval; the CLI
(`moe-platform rollout ...`) and the admin route (`/admin/rollout`) call it by name. It appends every event to the
app's audit log (JSONL) and exports `moe_serve_rollout_weight{model,version}`, `moe_serve_rollout_state{model}` and
`moe_serve_rollout_rollbacks{model}` to Ray's metrics (Prometheus).
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayTaskError

from moe_platform.serving.app_metrics import AppMetrics
from moe_platform.serving.rollout import STATES, Rollout, RolloutSpec

NAMESPACE = "moe-platform"
logger = logging.getLogger("moe_platform.serving")


def actor_name(app: str) -> str:
    return f"rollout:{app}"


class RolloutController:
    """Ray actor (one call at a time) around `Rollout`."""

    def __init__(self, app: str, model_name: str, audit_log: str, replica_ttl_s: float = 10.0):
        from ray.util import metrics as ray_metrics

        self.audit_log = Path(audit_log)
        self.audit_log.parent.mkdir(parents=True, exist_ok=True)
        self.rollout = Rollout(app, self._append, replica_ttl_s=replica_ttl_s)
        last = _last_event(self.audit_log)
        if last:
            self.rollout.restore(last)
        self.tags = {"model": model_name}
        self.metrics = AppMetrics(model_name, replica_ttl_s)
        self._weight = ray_metrics.Gauge("moe_serve_rollout_weight", "percent of traffic per model version during "
                                         "and after rollouts", ("model", "version"))
        self._state = ray_metrics.Gauge("moe_serve_rollout_state", "rollout state: " + ", ".join(
            f"{i} {s}" for i, s in enumerate(STATES)), ("model",))
        self._rollbacks = ray_metrics.Counter("moe_serve_rollout_rollbacks", "automatic rollbacks", ("model",))
        self._exported: dict[str, int] = {}
        self._counted = 0
        self._export()

    def _append(self, event: dict) -> None:
        record = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event["time"])), **event}
        with self.audit_log.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        logger.info("rollout %s: %s (%s)", event["event"], event["reason"], event["by"])

    def _export(self) -> None:
        r = self.rollout
        self._state.set(STATES.index(r.state), self.tags)
        weights = dict(r.weights or {})
        for version in set(self._exported) | set(weights):
            self._weight.set(weights.get(version, 0), {**self.tags, "version": version})
        self._exported = weights
        if r.rollbacks > self._counted:
            self._rollbacks.inc(r.rollbacks - self._counted, self.tags)
            self._counted = r.rollbacks

    def _after(self, result):
        self._export()
        return result

    # Every method ticks the state machine (replicas sync every metrics interval, so time moves it on).
    def sync(self, replica: str, version: str, versions: dict, stats: dict, probe: dict | None = None,
             engines: dict | None = None, evaluation: dict | None = None) -> dict:
        self.metrics.report(replica, time.time(), engines or {}, stats)
        return self._after(self.rollout.sync(replica, version, versions, stats, probe, evaluation))

    def metrics_text(self) -> str:
        return self.metrics.render(time.time())

    def start(self, spec: dict, by: str) -> dict:
        return self._after(self.rollout.start(RolloutSpec.parse(spec), by))

    def declare(self, section: dict | None, by: str) -> dict:
        return self._after(self.rollout.declare(section, by))

    def promote(self, by: str, reason: str = "promoted by hand") -> dict:
        return self._after(self.rollout.promote(by, reason))

    def abort(self, by: str, reason: str = "aborted by hand") -> dict:
        return self._after(self.rollout.abort(by, reason))

    def set_split(self, weights: dict, by: str) -> dict:
        return self._after(self.rollout.set_split(weights, by))

    def refuse(self, reason: str, by: str) -> dict:
        return self._after(self.rollout.refuse(reason, by))

    def set_traffic(self, weights: dict, by: str) -> dict:
        return self._after(self.rollout.set_traffic(weights, by))

    def status(self) -> dict:
        self.rollout.tick()
        return self._after({**self.rollout.status(), "audit_log": str(self.audit_log)})


def _last_event(path: Path) -> dict | None:
    if not path.is_file():
        return None
    for line in reversed(path.read_text(encoding="utf-8").splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s: skipping a line that is not JSON (a write cut short?)", path)
    return None


def controller(app: str, model_name: str = "", audit_log: str = "", replica_ttl_s: float = 10.0):
    """The app's controller actor, created (detached, on the head node) if it does not exist yet."""
    return ray.remote(RolloutController).options(
        name=actor_name(app), namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        resources={"node:__internal_head__": 0.001},  # the on-demand head (and its disk, for the audit log)
        scheduling_strategy="DEFAULT",  # not inside a caller's placement group
        max_restarts=-1, max_concurrency=1,  # one call at a time; a restart picks up from the audit log
    ).remote(app, model_name, audit_log, replica_ttl_s)


async def ask(ref):
    """The result of a controller call; a refusal raises the controller's own error (RolloutError, ...), not Ray's
    wrapper with the actor's traceback."""
    try:
        return await ref
    except RayTaskError as e:
        raise e.cause from None


def result(ref, timeout: float = 60):
    """`ask` for synchronous callers."""
    try:
        return ray.get(ref, timeout=timeout)
    except RayTaskError as e:
        raise e.cause from None


def existing(app: str):
    """The controller of a running app (ValueError naming the app when it has none)."""
    try:
        return ray.get_actor(actor_name(app), namespace=NAMESPACE)
    except ValueError:
        raise ValueError(f"app {app!r} has no rollout controller: is the moe-platform Serve app {app!r} deployed "
                         f"on this cluster?") from None


def who() -> str:
    """Who runs a command, for the audit log."""
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # noqa: BLE001 - no user name in some containers
        return socket.gethostname()


@dataclasses.dataclass(frozen=True)
class AutoRollout:
    """A training run's `on_export` hook for `[rollout] auto = true`: publish the final export (`publisher`, the
    registry's ExportPublisher), then start a rollout of that version in the Serve app `app`, loaded from the
    registry (`spec` without `to`/`source`). Logged, never fatal: the export and the published version stay."""

    publisher: Any
    app: str
    spec: dict
    run: str

    def __call__(self, export_dir: Path, step: int) -> int | None:
        version = self.publisher(export_dir, step)
        if version is None:
            return None
        name = self.publisher.name
        spec = {**self.spec, "to": f"{name}-{version}", "source": f"registry://{name}@{version}"}
        try:
            status = result(existing(self.app).start.remote(spec, f"training:{self.run}"))
        except Exception as e:  # noqa: BLE001 - see the docstring
            logger.error("starting the rollout of registry://%s@%d in app %r failed: %s", name, version, self.app, e)
            return version
        logger.warning("rolling registry://%s@%d out to app %r as version %s (state %s)", name, version, self.app,
                       spec["to"], status["state"])
        return version


def auto_rollout(cfg, publisher) -> AutoRollout:
    """The hook of `cfg.rollout` (checked now, before training starts: a bad section fails the run at once)."""
    from moe_platform.serving.rollout import RolloutSpec, read_probe_file

    r = cfg.rollout
    section: dict = {"steps": [int(x) for x in r.steps.split(",")], "dwell_s": r.dwell, "blue_green": r.blue_green,
                     "gates": {}}
    if r.blue_green:
        del section["steps"]
    if r.probe_file:
        section["gates"]["quality"] = {"file": str(Path(r.probe_file).expanduser().resolve()),
                                       "max_loss_increase": r.max_loss_increase}
    try:
        section = read_probe_file(section)
        RolloutSpec.parse({**section, "to": "check"})
    except ValueError as e:
        raise ValueError(f"[rollout] section: {e}") from None
    return AutoRollout(publisher, r.app, section, cfg.run.name)
