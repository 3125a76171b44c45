"""A checkpoint before Ray Train resizes a running job, so that growing or shrinking loses no step.

Ray Train's elastic policy (ScalingConfig(num_workers=(min, max))) checks every
`elastic_resize_monitor_interval_s` how many workers the resources it holds allow, and when that number changes it
shuts the running worker group down and starts one of the new size, which resumes from the latest checkpoint:
every step since that checkpoint would be computed twice. `ResizeCheckpointCallback` runs in Ray Train's controller
and, just before such a resize is carried out, asks the running workers for a checkpoint and waits (at most
elastic.resize_checkpoint_timeout_s) until every one of them has committed it; only then does Ray stop the group.

The request travels as a function run on each worker actor's own thread (the training loop runs on another): it
sets a flag that the trainer sees at its next preemption check, answered like a preemption notice (a just-in-time
checkpoint on all ranks, then the workers wait to be stopped), and returns the checkpointed step. A worker that
finishes, fails or never reaches a check answers too (with no step), so the controller never waits for nothing.
The same path serves growth (capacity came back: a node added, Serve scaled down) and shrinkage that Ray decides
while the workers are still alive (another requester of higher priority took resources, see moe_platform.cluster).
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("moe_platform.train.resize")

PARK_S = 600.0  # how long a checkpointed worker waits to be stopped before failing (which also restarts the group)

_requested = threading.Event()
_answered = threading.Event()
_answer: dict[str, int | None] = {"step": None}


# -- inside a Ray Train worker ---------------------------------------------------------------------------------------


def request_checkpoint(timeout_s: float) -> int | None:
    """Run by the controller on a worker actor: ask the training loop for a checkpoint and wait for it.
    Returns the committed step, or None when the loop ended (or timed out) without one."""
    _requested.set()
    if not _answered.wait(timeout_s):
        return None
    return _answer["step"]


def resize_requested() -> bool:
    """Whether the controller asked this worker for a checkpoint before a resize (checked with preemption notices)."""
    return _requested.is_set()


def answer(step: int | None) -> None:
    """The training loop's reply: the step it committed for the resize, or None when it stopped for another reason."""
    _answer["step"] = step
    _answered.set()


def park(step: int) -> None:
    """After the resize checkpoint: wait for Ray to stop this worker (returning would end the run as finished)."""
    log.warning("checkpointed step %d for a resize of the worker group; waiting for Ray Train to restart it", step)
    threading.Event().wait(PARK_S)
    raise RuntimeError(f"checkpointed step {step} for a resize, but Ray Train did not stop the worker group within "
                       f"{PARK_S:.0f} s; failing so that it restarts")


# -- inside Ray Train's controller -----------------------------------------------------------------------------------


def build_resize_callback(timeout_s: float):
    """A Ray Train controller callback (RunConfig(callbacks=[...])) that checkpoints a running group before a resize."""
    from moe_platform import ray_compat

    ControllerCallback, WorkerGroupCallback = ray_compat.train_controller_callback_bases()

    class ResizeCheckpointCallback(ControllerCallback, WorkerGroupCallback):
        def __init__(self):
            self._group = None

        def after_worker_group_start(self, worker_group) -> None:
            self._group = worker_group

        def before_worker_group_shutdown(self, worker_group) -> None:
            self._group = None

        def before_controller_execute_resize_decision(self, resize_decision) -> None:
            group = self._group
            if group is None:  # a start or a restart after a failure: nothing is running to checkpoint
                return
            import ray

            size = len(group.get_workers())
            if resize_decision.num_workers == size:
                return
            t0 = time.monotonic()
            log.info("resizing the training worker group %d -> %d: asking the workers for a checkpoint first",
                     size, resize_decision.num_workers)
            try:
                refs = group.execute_async(request_checkpoint, timeout_s)
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s + 10)
                steps = []
                for ref in ready:
                    try:
                        steps.append(ray.get(ref))
                    except Exception as e:  # a dead worker: Ray's failure handling takes over after the resize
                        log.warning("a worker could not checkpoint before the resize: %s", e)
                        steps.append(None)
            except Exception as e:  # the group is going away anyway; resize without the checkpoint
                log.warning("could not ask the workers for a checkpoint before the resize: %s", e)
                return
            done = {s for s in steps if s is not None}
            if len(steps) == size and len(done) == 1 and None not in steps:
                log.info("workers committed step %d for the resize in %.1f s", done.pop(), time.monotonic() - t0)
            else:
                log.warning("resizing without a complete checkpoint (worker answers %s); the new group resumes from "
                            "the latest committed one", steps)

    return ResizeCheckpointCallback()


__all__ = ["answer", "build_resize_callback", "park", "request_checkpoint", "resize_requested"]
