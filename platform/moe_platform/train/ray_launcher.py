"""Run training as Ray Train (V2) workers: elastic, spot-tolerant, observable.

`launch_ray(cfg)` connects to a Ray cluster (`address`, else RAY_ADDRESS, else an embedded local one), refuses up
front what can never run (an unreachable cluster, more workers than the cluster can ever host, an impossible layout,
unwritable storage), then runs a `TorchTrainer` whose workers each run the same `Trainer` as the local launcher.
Ray sets up torch.distributed (gloo on CPU, NCCL on GPU) and LOCAL_RANK; every worker plans the layout for the world
size it got and resumes from the run's latest committed checkpoint, whatever layout wrote it.

How the trainer maps onto Ray Train:
- Checkpoints. The trainer commits `<storage_path>/<name>/checkpoints/step_N` (every rank's shards, written straight
  to the shared filesystem), and `<storage_path>/<name>` is also Ray's run directory, so each commit is reported in
  place (an identity "upload"): Ray's Result and dashboard know it without a copy. The trainer deletes old
  checkpoints itself; Ray only indexes them (its index is pruned to the checkpoints left at the start and end).
  With a storage URI (s3://, gs://, file://) each node works in a local mirror (run.local_dir) and the trainer
  uploads every checkpoint itself, COMMITTED last (moe_platform.checkpoint.remote); Ray is handed the stored copy
  only once that upload has committed, so a rank that dies mid-upload never makes a half checkpoint Ray's latest.
- Reports. `ray.train.report` is a barrier across workers whose per-worker queue holds one report and is drained
  once per controller poll (~2 s), so reporting every step would throttle training to that rate. Every rank reports
  at checkpoints instead (at most about one per poll; always the last and a just-in-time one), handing the report
  to Ray's background thread (CheckpointUploadMode.ASYNC) so that training never waits for the queue; per-step
  numbers go to metrics.jsonl (the trainer) and the metrics below.
- Failures. A dead worker makes Ray restart the whole group (up to failure.max_failures times); the new workers
  resume from the latest committed checkpoint and redo only the steps after it.
- Preemption. Ray Train watches node drains (spot reclaim notices) and marks every worker of the group with the
  notice. Each rank reads its own mark every failure.preemption_check_steps steps and the ranks agree through one
  all-reduce of a flag over their process group (a fraction of a millisecond); `ray.train.get_preemption_info()`
  would agree through a Ray actor instead, a barrier of several milliseconds per check, and is used only where the
  worker's own mark cannot be read. On a notice every rank writes a just-in-time checkpoint and stops; the workers
  then wait for the node to go: returning would end the run as finished. Ray restarts the group at the drain
  deadline plus failure.preemption_grace_s, charging failure.max_preemption_failures, on the nodes that are left;
  with elastic.min_workers < max_workers it may come back on fewer workers (resharded).
- Resize. With elastic.min_workers < max_workers, Ray Train checks every elastic.resize_interval_s how many workers
  its resources allow and restarts the group at that size when it changed (a node came back, or a higher-priority
  requester such as Serve took resources away). Just before, the controller callback in moe_platform.train.resize
  asks the running workers for a checkpoint, answered like a preemption notice, so a resize loses no step.

Metrics (ray.util.metrics from rank 0, tag `run`; Prometheus shows them with Ray's `ray_` prefix):
    moe_train_step                last optimizer step finished
    moe_train_loss                training loss of that step
    moe_train_tokens_per_s        training throughput of the whole job (tokens / s)
    moe_train_mfu                 model FLOPs utilisation against the measured (CPU) or known (GPU) matmul peak
    moe_train_expert_imbalance    most-loaded expert's tokens over the mean, averaged over layers (1.0 = balanced)
    moe_train_checkpoint_seconds  wall time the training loop spent on the last checkpoint
    moe_train_restarts            counter: worker-group starts that resumed from a checkpoint
    moe_train_preemptions         counter: preemption notices answered with a just-in-time checkpoint
    moe_train_lost_steps          counter: steps computed again after a restart (done after the checkpoint resumed)
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moe_platform import ray_compat
from moe_platform.checkpoint import checkpoint_step
from moe_platform.checkpoint.files import check_writable
from moe_platform.checkpoint.remote import RemoteRun, is_uri, mirror_dir
from moe_platform.config import Config, config_from_dict, config_to_dict
from moe_platform.parallel import resolve_layout
from moe_platform.train import resize
from moe_platform.train.launch import world_size_for
from moe_platform.train.trainer import DistContext, Trainer, TrainerHooks, model_args_for

log = logging.getLogger("moe_platform.train.ray")

RAY_RUN_INDEX = "checkpoint_manager_snapshot.json"  # Ray Train's index of reported checkpoints in the run dir
UNKNOWN_DEADLINE_S = 120.0  # Ray Train's wait when a drain gives no deadline
PARK_MARGIN_S = 60.0  # how much longer than Ray's restart point a preempted worker waits before failing loudly
REPORT_INTERVAL_S = 2.0  # Ray Train takes one report per controller poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s)


# -- what the job needs ------------------------------------------------------------------------------------------


def num_workers_for(cfg: Config) -> int | tuple[int, int]:
    """Ray's worker count: an elastic (min, max) range when elastic.min_workers < max_workers, else a fixed count."""
    e = cfg.elastic
    if e.min_workers < e.max_workers:
        return (e.min_workers, e.max_workers)
    return world_size_for(cfg)


def _worker_range(num_workers: int | tuple[int, int]) -> tuple[int, int]:
    return num_workers if isinstance(num_workers, tuple) else (num_workers, num_workers)


def check_layouts(cfg: Config, lo: int, hi: int) -> None:
    """Every world size Ray may hand the job must have a valid layout, or a restart would fail on the workers."""
    args = model_args_for(cfg)
    for world_size in range(lo, hi + 1):
        try:
            resolve_layout(cfg, world_size, args)
        except ValueError as e:
            raise ValueError(f"no valid layout for {world_size} worker(s), which Ray may give this job "
                             f"(workers {lo}..{hi}): {e}") from e


def with_absolute_paths(cfg: Config) -> Config:
    """A copy whose local paths are absolute: Ray workers run in their own working directories, maybe elsewhere.
    A storage URI (s3://, gs://, file://) stays as it is: every worker opens it through pyarrow, as Ray does."""
    data = copy.deepcopy(config_to_dict(cfg))
    run = data["run"]
    if not is_uri(run["storage_path"]):
        run["storage_path"] = str(Path(run["storage_path"]).expanduser().resolve())
    if run["local_dir"]:  # an empty one means each worker's own ~/.cache/moe-platform/runs/...
        run["local_dir"] = str(Path(run["local_dir"]).expanduser().resolve())
    if data["data"]["path"] and Path(data["data"]["path"]).expanduser().exists():
        data["data"]["path"] = str(Path(data["data"]["path"]).expanduser().resolve())
    if data["init"]["from_hf"]:
        data["init"]["from_hf"] = str(Path(data["init"]["from_hf"]).expanduser().resolve())
    if data["data"]["cache_dir"]:
        data["data"]["cache_dir"] = str(Path(data["data"]["cache_dir"]).expanduser().resolve())
    return config_from_dict(data)


def check_storage(cfg: Config) -> tuple[Path, RemoteRun]:
    """The run directory, created and probed for writing (on this machine: a local storage path must be shared),
    and the run's storage as a `RemoteRun` (also for a local path), where Ray Train keeps its checkpoint index.
    A storage URI is probed through pyarrow, so that an unknown scheme, an unreachable bucket or missing write access
    fail here; the directory returned is then the run directory's local path for file://, and for object storage
    this machine's mirror."""
    if is_uri(cfg.run.storage_path):
        remote = RemoteRun(cfg.run.storage_path, cfg.run.name)
        remote.check_writable()
        run_dir = Path(remote.root) if remote.is_local else mirror_dir(cfg.run.storage_path, cfg.run.name,
                                                                       cfg.run.local_dir)
        return run_dir, remote
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    if "runtime_resources" in run_dir.parts:
        log.warning("run directory %s lies in the copy of the job's working dir, which Ray deletes with the cluster; "
                    "give run.storage_path as an absolute path on shared storage", run_dir)
    check_writable(run_dir, f"run.storage_path {cfg.run.storage_path!r}")
    return run_dir, RemoteRun.local(run_dir)


def prune_ray_index(store: RemoteRun) -> None:
    """Keep Ray Train's index of reported checkpoints in step with the trainer, which deletes old checkpoints itself:
    Ray refuses to start a run (and Result.from_path to load one) whose index names a checkpoint that is gone. The
    trainer resumes from its own directory, so an index this cannot make sense of is simply dropped. One function
    for every storage: `store` is the run's directory on a local disk or behind a storage URI."""
    data = store.get_bytes(RAY_RUN_INDEX)
    if data is None:
        return

    def exists(entry) -> bool:
        return store.exists(entry["checkpoint_dir_name"])

    try:
        state = json.loads(data)
        results, order = state["checkpoint_results"], state["checkpoint_report_indices"]
        if len(results) != len(order):
            raise ValueError("checkpoint_results and checkpoint_report_indices differ in length")
        kept = [i for i, entry in enumerate(results) if exists(entry)]
        latest = state.get("latest_checkpoint_result")
        if len(kept) == len(results) and (latest is None or exists(latest)):
            return
        state["checkpoint_results"] = [results[i] for i in kept]
        state["checkpoint_report_indices"] = [order[i] for i in kept]
        if latest is not None and not exists(latest):
            state["latest_checkpoint_result"] = state["checkpoint_results"][-1] if kept else None
        pending = list(zip(state["pending_training_results"], state["pending_validation_specs"], strict=True))
        pending = [(r, v) for r, v in pending if exists(r)]
        state["pending_training_results"] = [r for r, _ in pending]
        state["pending_validation_specs"] = [v for _, v in pending]
        for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                    "failed_validation_checkpoint_dir_names"):
            state[key] = [n for n in state.get(key, []) if store.exists(n)]
        store.put_bytes(RAY_RUN_INDEX, json.dumps(state).encode())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.info("dropping Ray's checkpoint index %s, which does not match the run's checkpoints: %s",
                 store.path(RAY_RUN_INDEX), e)
        store.delete(RAY_RUN_INDEX)


# -- the cluster ---------------------------------------------------------------------------------------------------


def _host_port(address: str) -> tuple[str, int] | None:
    """host and port of a GCS (`host:port`) or Ray Client (`ray://host:port`) address; None for `auto`."""
    scheme, sep, rest = address.partition("://")
    if sep and scheme in ("http", "https"):
        raise ValueError(f"Ray address {address!r} is a dashboard (job submission) address; training connects to "
                         f"the cluster's GCS address (host:6379) or a Ray Client address (ray://host:10001)")
    hostport = rest if sep else address
    if hostport == "auto":
        return None
    host, colon, port = hostport.rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"Ray address {address!r} is not of the form host:port or ray://host:port")
    return host.strip("[]"), int(port)


def connect(address: str | None, num_cpus: int) -> bool:
    """Connect to `address` / RAY_ADDRESS, or start an embedded local Ray; True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address in (None, "local"):
        # address="local" (not None): never attach by accident to some other cluster running on this machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        return True
    target = _host_port(address)
    if target is not None:
        try:
            socket.create_connection(target, timeout=5).close()
        except OSError as e:
            raise ValueError(f"no Ray cluster reachable at {address!r} ({e}); start one (`ray start --head`) or "
                             f"unset RAY_ADDRESS to train on an embedded local Ray") from e
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, TimeoutError) as e:
        raise ValueError(f"could not connect to the Ray cluster at {address!r}: {e}") from e
    return True


def _cluster_capacity(per_worker: dict[str, float]) -> tuple[int, str]:
    """How many workers the cluster can ever host: from the autoscaler's limits when there is an autoscaler,
    else from the nodes it has (a worker must fit on one node)."""
    import ray

    limits = ray_compat.autoscaler_max_resources()
    if limits:
        fits = min(int(limits.get(k, 0) // v) for k, v in per_worker.items())
        return fits, f"autoscaler maximum {dict(limits)}"
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = sum(min(int(n["Resources"].get(k, 0) // v) for k, v in per_worker.items()) for n in nodes)
    return fits, f"{len(nodes)} node(s) with {[{k: n['Resources'].get(k, 0) for k in per_worker} for n in nodes]}"


def _autoscaler_running() -> bool:
    """Whether an autoscaler that can add nodes reports on this cluster. Ray's v1 autoscaler (the default of `ray up`)
    does not expose its node limits, so the nodes that exist now say nothing about what it can add. A head started
    without a cluster config also runs the monitor, with a read-only provider whose node types just mirror the
    existing nodes (`node_<id>`): that one can add nothing."""
    report = ray_compat.autoscaler_report()
    return _report_can_add_nodes(report)


def _report_can_add_nodes(report: dict | None) -> bool:
    if not report:
        return False
    mapping = report.get("node_type_mapping") or {}
    types = set(mapping.values()) | set(report.get("active_nodes") or {}) | set(report.get("pending_launches") or {})
    readonly = {f"node_{node_id}" for node_id in mapping}
    return bool(types - readonly)


def check_cluster_fits(per_worker: dict[str, float], lo: int, hi: int, address: str | None) -> None:
    fits, what = _cluster_capacity(per_worker)
    where = address or os.environ.get("RAY_ADDRESS") or "the local Ray"
    if fits < lo and not what.startswith("autoscaler") and _autoscaler_running():
        log.warning("the Ray cluster at %s hosts %d of the %d training worker(s) needed now (%s); its autoscaler "
                    "may add nodes, so Ray Train waits for them", where, fits, lo, what)
        return
    if fits < lo:
        raise ValueError(f"the job needs at least {lo} training worker(s) of {per_worker}, but the Ray cluster at "
                         f"{where} can host at most {fits} ({what}); lower the parallel degrees / elastic.min_workers "
                         f"or elastic.cpus_per_worker, or add nodes")
    if fits < hi:
        log.warning("the Ray cluster can host %d of the %d workers asked for (%s); training on fewer", fits, hi, what)


# -- inside each Ray Train worker ----------------------------------------------------------------------------------


class TrainMetrics:
    """The job's Prometheus metrics (see the module docstring), set from rank 0."""

    def __init__(self, run_name: str):
        from ray.util.metrics import Counter, Gauge

        def gauge(name, doc):
            return Gauge(name, doc, tag_keys=("run",))

        self.step = gauge("moe_train_step", "last optimizer step finished")
        self.loss = gauge("moe_train_loss", "training loss of the last step")
        self.tokens_per_s = gauge("moe_train_tokens_per_s", "training throughput of the job, tokens per second")
        self.mfu = gauge("moe_train_mfu", "model FLOPs utilisation of the last step")
        self.imbalance = gauge("moe_train_expert_imbalance", "max/mean tokens per expert, averaged over layers")
        self.checkpoint_s = gauge("moe_train_checkpoint_seconds", "seconds the loop spent on the last checkpoint")
        self.restarts = Counter("moe_train_restarts", "worker-group starts that resumed from a checkpoint",
                                tag_keys=("run",))
        self.preemptions = Counter("moe_train_preemptions", "preemption notices answered with a checkpoint",
                                   tag_keys=("run",))
        self.lost_steps = Counter("moe_train_lost_steps", "steps computed again after a restart",
                                  tag_keys=("run",))
        for m in (self.step, self.loss, self.tokens_per_s, self.mfu, self.imbalance, self.checkpoint_s,
                  self.restarts, self.preemptions, self.lost_steps):
            m.set_default_tags({"run": run_name})

    def record_step(self, rec: dict[str, Any]) -> None:
        self.step.set(rec["step"])
        self.loss.set(rec["loss"])
        self.tokens_per_s.set(rec["tokens_per_s"])
        self.mfu.set(rec["mfu"])
        self.imbalance.set(rec["expert_imbalance"])


class RayBridge:
    """The Trainer's hooks inside a Ray Train worker: checkpoint reports, preemption notices, metrics, progress."""

    def __init__(self, cfg: Config, dist: DistContext, progress: bool):
        self.cfg = cfg
        self.dist = dist
        self.progress = progress and dist.rank == 0
        self.metrics = TrainMetrics(cfg.run.name) if dist.rank == 0 else None
        self.trainer: Trainer | None = None
        self.step_recs: dict[int, dict[str, Any]] = {}  # numbers of the steps not yet checkpointed, for reports
        self.last_reported: Path | None = None
        self.last_report_t = -math.inf
        self.preemption = None  # the ray.train.PreemptionInfo answered with a just-in-time checkpoint
        self.resizing = False  # Ray Train asked for a checkpoint before it resizes the worker group
        self.mark = time.perf_counter()  # the end of the last step's hooks: a checkpoint save starts right after
        self.log_every = max(1, cfg.train.steps // 50)

    def hooks(self, on_export=None) -> TrainerHooks:
        return TrainerHooks(on_step=self.on_step, on_checkpoint=self.on_checkpoint,
                            preemption_requested=self.preemption_requested, on_export=on_export)

    def on_setup(self, trainer: Trainer) -> None:
        self.trainer = trainer
        if self.metrics is not None and trainer.resumed_from is not None:
            self.metrics.restarts.inc()
            if trainer.lost_steps:
                self.metrics.lost_steps.inc(trainer.lost_steps)
        if self.dist.rank == 0:
            how = f"resumed from step {trainer.resumed_from}" if trainer.resumed_from is not None else "from scratch"
            log.info("[moe-platform] rank 0 of %d: layout %s, %s", self.dist.world_size, trainer.layout, how)

    def on_step(self, rec: dict[str, Any]) -> None:
        self.step_recs[rec["step"]] = {k: v for k, v in rec.items() if isinstance(v, (int, float))}
        if self.metrics is not None:
            self.metrics.record_step(rec)
        step, total = rec["step"], self.cfg.train.steps
        if self.progress and (step % self.log_every == 0 or step == total):
            log.info("[moe-platform] step %d/%d loss %.4f tok/s %.0f", step, total, rec["loss"], rec["tokens_per_s"])
        if not self.dist.distributed:
            # One process saves in the background without calling on_checkpoint: report each commit once seen.
            committed = self.trainer.checkpointer.last_committed
            if committed is not None and committed != self.last_reported:
                self.on_commit(committed, checkpoint_step(committed), self.trainer.checkpointer.last_blocking_s)
        self.mark = time.perf_counter()

    def preemption_requested(self) -> bool:
        """This rank's view, at each check (the trainer then all-reduces the flag: any rank's notice stops all)."""
        info = ray_compat.local_preemption_info()
        self.mark = time.perf_counter()
        if info is None:
            # Ray Train is about to resize the group (moe_platform.train.resize): a checkpoint first, as for a notice.
            self.resizing = self.resizing or resize.resize_requested()
            return self.resizing
        self.preemption = info
        return True

    def settle_stop(self) -> bool:
        """After the ranks stopped together at a check: whether it was for a preemption (else a resize), the same
        answer on every rank. Ray marks the workers one by one, so a rank that stopped because another saw the notice
        may not hold it yet: the ranks share what they hold (once per stop, never per step)."""
        held = [self.preemption]
        if self.dist.distributed:
            import torch

            held = [None] * self.dist.world_size
            torch.distributed.all_gather_object(held, self.preemption)
        info = next((i for i in held if i is not None), None)
        if info is None:
            return False
        self.preemption = self.preemption or info
        if self.metrics is not None:
            self.metrics.preemptions.inc()
        if self.dist.rank == 0:
            log.warning("[moe-platform] preemption notice for ranks %s (nodes %s, deadline_ms %s): wrote a "
                        "just-in-time checkpoint", info.preempted_ranks, info.preempted_node_ids, info.deadline_ms)
            if self.trainer is not None:
                self.trainer.log_event("preempted", preempted_ranks=list(info.preempted_ranks),
                                       deadline_ms=info.deadline_ms)
        return True

    def on_checkpoint(self, committed: Path | None, step: int) -> None:
        self.on_commit(committed, step, time.perf_counter() - self.mark)

    def on_commit(self, committed: Path | None, step: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.checkpoint_s.set(seconds)
        if self._report_due(step):
            self._report(committed, step, seconds)
        self.last_reported = committed
        self.step_recs = {s: r for s, r in self.step_recs.items() if s > step}

    def _report_due(self, step: int) -> bool:
        """Ray takes one report per controller poll and queues the rest, which would hold up the end of a run that
        checkpoints more often: between polls only a commit that comes after a quiet interval is reported (rank 0's
        clock decides), and the last one and a just-in-time one always are (any rank that holds the notice or the
        resize request decides). The ranks agree: reports are collective."""
        due = (step >= self.cfg.train.steps or self.preemption is not None or self.resizing
               or (self.dist.rank == 0 and time.monotonic() - self.last_report_t >= REPORT_INTERVAL_S))
        if self.dist.distributed:
            from moe_platform.parallel.comm import any_rank

            due = any_rank(due)
        return due

    def _report(self, committed: Path | None, step: int, seconds: float) -> None:
        import functools

        import ray.train

        remote = self.trainer.remote if self.trainer is not None else None
        upload = _already_in_place
        if remote is None:
            checkpoint = ray.train.Checkpoint.from_directory(str(committed)) if committed is not None else None
        elif self.dist.rank == 0:
            # A storage URI is Ray's storage too: the checkpoint's copy there is the one to report, handed to Ray
            # only once the trainer's upload has COMMITTED it (a half upload is never Ray's latest checkpoint).
            storage = ray.train.get_context().get_storage()
            checkpoint = ray.train.Checkpoint(remote.step_path(step), filesystem=storage.storage_filesystem)
            upload = functools.partial(_already_in_place,
                                       committed=functools.partial(self.trainer.checkpointer.wait_remote, step))
        else:
            checkpoint = None
        # The checkpoint already lies in Ray's run directory: "uploading" it is the identity, done off the training
        # thread so that the one-deep report queue never holds training up (and Ray must not delete it after).
        ray.train.report({**self.step_recs.get(step, {}), "step": step, "checkpoint_seconds": seconds},
                         checkpoint=checkpoint,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         checkpoint_upload_fn=upload, delete_local_checkpoint_after_upload=False)
        self.last_report_t = time.monotonic()

    def await_reclaim(self, step: int) -> None:
        """After a just-in-time checkpoint: wait for the node to go (returning would end the run as finished).
        Ray restarts the group at the drain deadline plus the grace; failing loudly later forces a restart anyway."""
        info = self.preemption
        deadline_s = info.deadline_ms / 1000 if info.deadline_ms else time.time() + UNKNOWN_DEADLINE_S
        give_up = deadline_s + self.cfg.failure.preemption_grace_s + PARK_MARGIN_S
        log.warning("rank %d: checkpointed step %d for the preemption; waiting for Ray Train to restart the group",
                    self.dist.rank, step)
        threading.Event().wait(max(0.0, give_up - time.time()))
        raise RuntimeError(f"preempted at step {step} (checkpointed), but Ray Train did not restart the worker group "
                           f"by the drain deadline + grace; failing so that it does")


def _already_in_place(checkpoint, checkpoint_dir_name: str, committed=None):
    """Ray's "upload" of a checkpoint already in its run directory, on Ray's upload thread: the identity, after
    `committed()` has waited for the trainer's own upload to a storage URI to commit (and raised if it failed)."""
    if committed is not None:
        committed()
    return checkpoint


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: the Trainer on this worker's rank, with Ray's hooks."""
    import ray.train
    import torch

    ctx = ray.train.get_context()
    dist = DistContext(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank())
    os.environ.setdefault("LOCAL_RANK", str(dist.local_rank))  # DeepSpeed reads it; Ray's torch setup sets it
    cfg = config_from_dict(config["cfg"])
    torch.set_num_threads(max(1, int(cfg.elastic.cpus_per_worker)))  # the CPUs Ray reserved for this worker
    bridge = RayBridge(cfg, dist, config["progress"])
    trainer = Trainer(cfg, progress=False, dist=dist, hooks=bridge.hooks(config.get("on_export")))
    trainer.setup()
    bridge.on_setup(trainer)
    try:
        result = trainer.fit()
    except BaseException:
        resize.answer(None)  # a controller waiting for a resize checkpoint need not wait for this worker
        raise
    preempted = result.preempted and bridge.settle_stop()
    if result.preempted and not preempted:  # stopped for a resize (asked of this rank or another)
        resize.answer(result.final_step)
        resize.park(result.final_step)
    resize.answer(None)
    if preempted:
        bridge.await_reclaim(result.final_step)
    return {"run_dir": str(result.run_dir), "final_step": result.final_step, "final_loss": result.final_loss,
            "export_dir": str(result.export_dir) if result.export_dir else None,
            "resumed_from": result.resumed_from, "layout": result.layout, "world_size": dist.world_size}


# -- the driver ----------------------------------------------------------------------------------------------------


def _worker_runtime_env() -> dict | None:
    """Ship the library to the workers when it is imported from a source checkout rather than installed."""
    try:
        importlib.metadata.version("moe-platform")
        return None
    except importlib.metadata.PackageNotFoundError:
        import moe_platform

        return {"py_modules": [str(Path(moe_platform.__file__).parent)]}


def launch_ray(cfg: Config, address: str | None = None, progress: bool = True,
               on_export: Callable[[Path, int], None] | None = None) -> dict[str, Any]:
    """Train on Ray Train workers; returns rank 0's result (run_dir, final_step, final_loss, export_dir,
    resumed_from, layout, world_size) plus Ray's view of it (ray_checkpoint, ray_run_path). Rank 0's worker calls
    `on_export(export_dir, step)` after the final export (`moe_platform.cluster.registry.export_publisher`)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = with_absolute_paths(cfg)
    num_workers = num_workers_for(cfg)
    lo, hi = _worker_range(num_workers)
    check_layouts(cfg, lo, hi)
    run_dir, store = check_storage(cfg)
    e, f = cfg.elastic, cfg.failure
    per_worker = {"CPU": e.cpus_per_worker, **({"GPU": 1.0} if e.use_gpu else {})}
    started = connect(address, num_cpus=max(os.cpu_count() or 1, math.ceil(hi * e.cpus_per_worker)))
    try:
        check_cluster_fits(per_worker, lo, hi, address)
        prune_ray_index(store)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": config_to_dict(cfg), "progress": progress, "on_export": on_export},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=e.use_gpu,
                                         resources_per_worker={"CPU": e.cpus_per_worker},
                                         elastic_resize_monitor_interval_s=e.resize_interval_s),
            run_config=RunConfig(
                name=cfg.run.name, storage_path=cfg.run.storage_path,
                failure_config=FailureConfig(max_failures=f.max_failures,
                                             max_preemption_failures=f.max_preemption_failures,
                                             preemption_grace_s=f.preemption_grace_s),
                worker_runtime_env=_worker_runtime_env(),
                callbacks=[resize.build_resize_callback(e.resize_checkpoint_timeout_s)] if lo < hi else None),
        )
        try:
            result = trainer.fit()
        finally:
            prune_ray_index(store)  # so that Ray's Result.from_path(run_dir) works afterwards
    finally:
        if started:
            ray.shutdown()
    out = dict(result.return_value or {})
    out["ray_checkpoint"] = result.checkpoint.path if result.checkpoint is not None else None
    out["ray_run_path"] = result.path
    return out


__all__ = ["launch_ray", "num_workers_for", "train_loop_per_worker"]
