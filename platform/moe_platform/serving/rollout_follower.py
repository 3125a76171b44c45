"""A replica's side of rollouts: every interval, export the versions' metrics, report them with the versions' state
to the app's rollout controller (moe_platform.serving.rollout_controller), and follow its answer: load the versions
it names, run its quality probe, start the evaluation it gives this replica (an lm-evaluation-harness task on two
versions, on a thread of its own: it may take minutes, and neither the syncs nor the replica's requests wait for it;
its result goes with the following syncs), take its traffic split. Also carries the admin route's rollout commands
to it. A controller that is away leaves the split as it is; nothing here can take the replica down."""

from __future__ import annotations

import logging
import threading

import ray

from moe_platform.serving import rollout_controller
from moe_platform.serving.app_metrics import AppMetrics
from moe_platform.serving.errors import InvalidRequestError, NotFoundError, ServingError
from moe_platform.serving.replica_metrics import RayMetrics, RequestLog
from moe_platform.serving.rollout import RolloutError, known_split, read_probe_file
from moe_platform.serving.traffic import UnknownVersionError
from moe_platform.serving.versions import VersionSet

logger = logging.getLogger("ray.serve")  # the replica's log


class RolloutRequestError(ServingError):
    """A rollout command the controller refused (400 invalid, 409 one is running)."""

    type = "invalid_request_error"

    def __init__(self, message: str, code: str, status: int):
        super().__init__(message, code=code)
        self.status = status


class RolloutFollower:
    def __init__(self, versions: VersionSet, controller, replica: str, metrics: RayMetrics, requests: RequestLog,
                 interval_s: float):
        self.versions = versions
        self.controller = controller
        self.replica = replica
        self.metrics = metrics
        self.requests = requests
        self.probe_result: dict | None = None
        self.eval_result: dict | None = None  # the last evaluation's result, reported until the next one starts
        self._eval_id: str | None = None  # the evaluation started last (running or done)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), name="moe-metrics", daemon=True)

    def start(self) -> RolloutFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self, interval: float) -> None:
        warned = False
        while not self._stop.wait(interval):
            try:
                engines, stats = self.export_metrics()
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                logger.exception("exporting serving metrics failed")
                engines, stats = {}, {}
            try:
                answer = ray.get(self.controller.sync.remote(
                    self.replica, self.versions.version, self.versions.report(), stats, self.probe_result, engines,
                    self.eval_result), timeout=30)
                warned = False
            except Exception as e:  # noqa: BLE001 - a controller that is away leaves the split as it is
                if not warned:
                    logger.warning("the rollout controller did not answer (%s); the traffic split stays", e)
                    warned = True
                continue
            self.follow(answer)

    def export_metrics(self) -> tuple[dict[str, dict], dict[str, dict]]:
        """Export every engine's and version's metrics; return, per version, its engine's state and the requests
        finished since the last call, for the controller."""
        engines = self.versions.engines()
        self.metrics.forget(engines.values())
        requests = self.requests.take()
        stats: dict[str, dict] = {}
        state: dict[str, dict] = {}
        for version, engine in engines.items():
            now, ttft = self.metrics.export(engine, version)
            state[version] = {k: now[k] for k in AppMetrics.ENGINE_KEYS}
            done = requests.pop(version, {"counts": {}, "latency": []})
            self.metrics.export_requests(version, done["counts"], done["latency"])
            counts = done["counts"]
            stats[version] = {"requests": counts.get("2xx", 0) + counts.get("5xx", 0), "errors": counts.get("5xx", 0),
                              "latency": done["latency"], "ttft": ttft}
        return state, stats

    def follow(self, answer: dict) -> None:
        """Apply the controller's answer: load the versions it names, run its probe, take its split."""
        versions = self.versions
        for name, source in answer.get("sources", {}).items():
            versions.start_loading(name, source)
        probe = answer.get("probe")
        if probe and (self.probe_result or {}).get("id") != probe["id"]:
            self.probe_result = {"id": probe["id"], "losses": versions.score(probe["versions"], probe["prompts"])}
        job = answer.get("evaluation")
        if job and job["id"] != self._eval_id:
            self._eval_id, self.eval_result = job["id"], None
            threading.Thread(target=self._evaluate, args=(job,), name="moe-eval", daemon=True).start()
        split = known_split(answer.get("weights"), versions.names())
        versions.split = split or versions.config_split

    def _evaluate(self, job: dict) -> None:
        result = {"id": job["id"], **self.versions.evaluate(job)}
        if self._eval_id == job["id"]:  # not superseded by a newer evaluation meanwhile
            self.eval_result = result

    async def admin(self, action: str, body: dict) -> dict:
        """The admin route's rollout commands, carried out by the app's controller (every replica follows)."""
        by = f"admin-route:{body.get('by') or 'admin'}"
        controller, ask = self.controller, rollout_controller.ask
        try:
            if action == "status":
                return await ask(controller.status.remote())
            if action == "start":
                try:
                    spec = read_probe_file({k: v for k, v in body.items() if k not in ("action", "by")},
                                           self.versions.base_dir)
                except RolloutError as e:  # its message names the server path and what is (not) there: logged only
                    logger.warning("admin rollout start: %s", e)
                    raise RolloutError("gates.quality.file could not be read as probe prompts on this server (the "
                                       "replica log says why)") from None
                return await ask(controller.start.remote(spec, by))
            if action == "traffic":
                weights = body.get("weights")
                if not isinstance(weights, dict):
                    raise InvalidRequestError("weights ({VERSION: PERCENT, ...}) is required", param="weights")
                return await ask(controller.set_split.remote(weights, by))
            if action in ("promote", "abort"):
                method = getattr(controller, action)
                return await ask(method.remote(by, body.get("reason") or f"{action}d over the admin route"))
        except UnknownVersionError as e:
            raise NotFoundError(str(e), param="to", code="model_not_found") from None
        except RolloutError as e:
            raise RolloutRequestError(str(e), code=e.code, status=e.status) from None
        raise InvalidRequestError(f"unknown rollout action {action!r}; use start, status, promote, abort or traffic",
                                  param="action")
