"""Inside each Ray Train worker: the bridge between the trainer and Ray Train.

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
  worker's own mark cannot be read. On a notice every rank writes a just-in-time checkpoint and stops; once it has
  committed, the workers tell Ray Train not to wait for the drain deadline (ray_compat.end_preemption_wait) and
  wait to be torn down: returning would end the run as finished. Ray restarts the group at once, charging
  failure.max_preemption_failures, on the nodes that are left (a draining node takes no new workers); with
  elastic.min_workers < max_workers it comes back on fewer workers (resharded). The draining node keeps the
  notice's full deadline for everything else on it (Serve replicas move in that time).
- Resize. With elastic.min_workers < max_workers, Ray Train checks every elastic.resize_interval_s how many workers
  its resources allow and restarts the group at that size when it changed (a node came back, or a higher-priority
  requester such as Serve took resources away). Just before, the controller callback in moe_platform.train.resize
  asks the running workers for a checkpoint, answered like a preemption notice, so a resize loses no step.

Metrics (ray.util.metrics from rank 0, tag `run`; Prometheus shows them with Ray's `ray_` prefix):
    moe_train_step                last optimizer step finished
    moe_train_target_steps        train.steps: the step the run ends at (the no-progress alert ignores a finished run)
    moe_train_loss                training loss of that step
    moe_train_tokens_per_s        training throughput of the whole job (tokens / s)
    moe_train_mfu                 model FLOPs utilisation against the measured (CPU) or known (GPU) matmul peak
    moe_train_expert_imbalance    most-loaded expert's tokens over the mean, averaged over layers (1.0 = balanced)
    moe_train_checkpoint_seconds  wall time the training loop spent on the last checkpoint
    moe_train_last_checkpoint_timestamp_seconds  Unix time the last checkpoint committed (checkpoint age alerts)
    moe_train_step_seconds        the last step's own compute time (with moe_train_steps: the goodput rule)
    moe_train_steps               counter: optimizer steps computed, the ones computed again after a restart too
    moe_train_restarts            counter: worker-group starts that resumed from a checkpoint
    moe_train_preemptions         counter: preemption notices answered with a just-in-time checkpoint
    moe_train_lost_steps          counter: steps computed again after a restart (done after the checkpoint resumed)
plus the gauges of the run's objective (`Trainer.metric_gauges`), set from the step metrics that carry them; DPO's
(moe_platform.post_train): moe_train_rewards_{chosen,rejected,margin,accuracy}, moe_train_logps_{chosen,rejected},
moe_train_ref_logps_{chosen,rejected}, and at eval steps moe_train_val_rewards_{accuracy,margin} and
moe_train_val_loss; GRPO's: moe_train_grpo_{reward,reward_std,kl,clip_fraction,response_length,logp_gap,
sync_seconds,sync_bytes,rollout_tokens_per_s,learner_tokens_per_s,generate_seconds,score_seconds,learn_seconds} and
at eval steps moe_train_grpo_val_reward.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from moe_platform import ray_compat
from moe_platform.checkpoint import checkpoint_step
from moe_platform.config import Config, config_from_dict
from moe_platform.train import resize
from moe_platform.train.launch import place_rank
from moe_platform.train.trainer import DistContext, Trainer, TrainerHooks

log = logging.getLogger("moe_platform.train.ray")

UNKNOWN_DEADLINE_S = 120.0  # Ray Train's wait when a drain gives no deadline
PARK_MARGIN_S = 60.0  # how much longer than Ray's restart point a preempted worker waits before failing loudly
REPORT_INTERVAL_S = 2.0  # Ray Train takes one report per controller poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s)


# -- inside each Ray Train worker ----------------------------------------------------------------------------------


class TrainMetrics:
    """The job's Prometheus metrics (see the module docstring), set from rank 0."""

    def __init__(self, run_name: str, target_steps: int):
        from ray.util.metrics import Counter, Gauge

        def gauge(name, doc):
            return Gauge(name, doc, tag_keys=("run",))

        self.step = gauge("moe_train_step", "last optimizer step finished")
        self.target_steps = gauge("moe_train_target_steps", "the step the run ends at (train.steps)")
        self.loss = gauge("moe_train_loss", "training loss of the last step")
        self.tokens_per_s = gauge("moe_train_tokens_per_s", "training throughput of the job, tokens per second")
        self.mfu = gauge("moe_train_mfu", "model FLOPs utilisation of the last step")
        self.imbalance = gauge("moe_train_expert_imbalance", "max/mean tokens per expert, averaged over layers")
        self.checkpoint_s = gauge("moe_train_checkpoint_seconds", "seconds the loop spent on the last checkpoint")
        self.checkpoint_time = gauge("moe_train_last_checkpoint_timestamp_seconds",
                                     "Unix time the last checkpoint committed")
        self.step_s = gauge("moe_train_step_seconds", "compute time of the last optimizer step")
        self.steps = Counter("moe_train_steps", "optimizer steps computed (recomputed ones after a restart too)",
                             tag_keys=("run",))
        self.restarts = Counter("moe_train_restarts", "worker-group starts that resumed from a checkpoint",
                                tag_keys=("run",))
        self.preemptions = Counter("moe_train_preemptions", "preemption notices answered with a checkpoint",
                                   tag_keys=("run",))
        self.lost_steps = Counter("moe_train_lost_steps", "steps computed again after a restart",
                                  tag_keys=("run",))
        for m in (self.step, self.target_steps, self.loss, self.tokens_per_s, self.mfu, self.imbalance,
                  self.checkpoint_s, self.checkpoint_time, self.step_s, self.steps, self.restarts, self.preemptions,
                  self.lost_steps):
            m.set_default_tags({"run": run_name})
        self.target_steps.set(target_steps)
        self.run_name = run_name
        self.extra: dict[str, Any] = {}  # step-metrics key -> its gauge (the objective's, `add_gauges`)

    def add_gauges(self, gauges: dict[str, tuple[str, str]]) -> None:
        """Gauges set from the step metrics' `key`s: {key: (metric name, description)}."""
        from ray.util.metrics import Gauge

        for key, (name, doc) in gauges.items():
            if key not in self.extra:
                self.extra[key] = Gauge(name, doc, tag_keys=("run",))
                self.extra[key].set_default_tags({"run": self.run_name})

    def record_step(self, rec: dict[str, Any]) -> None:
        self.step.set(rec["step"])
        self.loss.set(rec["loss"])
        self.tokens_per_s.set(rec["tokens_per_s"])
        self.mfu.set(rec["mfu"])
        self.imbalance.set(rec["expert_imbalance"])
        self.step_s.set(rec["step_time_s"])
        self.steps.inc()
        for key, gauge in self.extra.items():
            if isinstance(rec.get(key), (int, float)):
                gauge.set(rec[key])


class RayBridge:
    """The Trainer's hooks inside a Ray Train worker: checkpoint reports, preemption notices, metrics, progress."""

    def __init__(self, cfg: Config, dist: DistContext, progress: bool):
        self.cfg = cfg
        self.dist = dist
        self.progress = progress and dist.rank == 0
        self.metrics = TrainMetrics(cfg.run.name, cfg.train.steps) if dist.rank == 0 else None
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
        if self.metrics is not None:
            self.metrics.add_gauges(trainer.metric_gauges)
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
            if committed is not None:
                self.metrics.checkpoint_time.set(time.time())
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
        """After a just-in-time checkpoint: have Ray Train restart the group now, on the nodes that stay (shrinking
        inside the elastic range), instead of at the drain deadline plus the grace; then wait to be torn down
        (returning would end the run as finished). Failing loudly after the deadline forces a restart anyway."""
        info = self.preemption
        deadline_s = info.deadline_ms / 1000 if info.deadline_ms else time.time() + UNKNOWN_DEADLINE_S
        give_up = deadline_s + self.cfg.failure.preemption_grace_s + PARK_MARGIN_S
        early = ray_compat.end_preemption_wait(self.cfg.failure.preemption_grace_s)
        log.warning("rank %d: checkpointed step %d for the preemption; waiting for Ray Train to restart the group "
                    "(%s)", self.dist.rank, step, "now" if early else "at the drain deadline")
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

    ctx = ray.train.get_context()
    dist = DistContext(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank())
    os.environ.setdefault("LOCAL_RANK", str(dist.local_rank))  # DeepSpeed reads it; Ray's torch setup sets it
    cfg = config_from_dict(config["cfg"])
    place_rank(cfg, dist.local_rank, int(cfg.elastic.cpus_per_worker))  # pinned, or as many as Ray reserved
    bridge = RayBridge(cfg, dist, config["progress"])
    trainer_cls = config.get("trainer_cls") or Trainer
    trainer = trainer_cls(cfg, progress=False, dist=dist, hooks=bridge.hooks(config.get("on_export")))
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
