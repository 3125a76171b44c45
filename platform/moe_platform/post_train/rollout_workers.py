"""Rollout workers on Ray: our serving engine (`rollout.RolloutEngine`) in `grpo.rollout_workers` Ray actors, placed
by Ray's scheduler beside the learner, and the weight sync through the object store.

- Placement: each worker asks for `grpo.rollout_resources` and prefers the learner rank 0's node (a soft node
  affinity: Ray places it elsewhere when that node is full). It is never inside the Ray Train worker group's
  placement group, whose resources are the learner's.
- Weights: the learner publishes its full weights once per step (`publish`: one `ray.put` of numpy arrays, from
  rank 0); every worker `ray.get`s them, which on a node is a read-only view into the node's shared memory (one copy
  per node, pulled the first time a worker there asks), and makes the views its parameters without copying
  (`Engine.update_weights`), as Serve replicas load registry versions. With LoRA the base weights travel once, when
  the workers start, and after each step only the adapters (a few MB), written into the policy's adapter slot.
- Failures: a worker that dies (or does not answer a round within grpo.rollout_timeout_s) is killed and replaced by
  a new one, started from the latest published weights, and its requests are generated again: each request carries
  its own seed, so the round's rollouts are the same as if it had not died. The workers are owned by the learner's
  rank 0: when the learner's worker group ends (a preemption, a resize), they go with it, and the new rank 0 starts
  new ones from the checkpoint it resumed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence

import torch

from moe_platform.cluster.registry import pack_weights, unpack_weights
from moe_platform.post_train.rollout import EngineSpec, RolloutEngine, RolloutRequest, RolloutResult

log = logging.getLogger("moe_platform.post_train")
MAX_ATTEMPTS = 3  # tries of one worker's share of a round (each on a new worker) before the round fails


class RolloutWorker:
    """The Ray actor: a rollout engine and the object-store buffers its weights are views of."""

    def __init__(self, spec: EngineSpec, weights: tuple, adapters: tuple | None):
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        arrays, dtypes = weights  # resolved by Ray from the published object: views into this node's store
        self.engine = RolloutEngine(spec, unpack_weights(arrays, dtypes), keepalive=arrays)
        if adapters is not None:
            self.engine.load_adapters(unpack_weights(*adapters))

    def ready(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def load_weights(self, weights: tuple) -> int:
        arrays, dtypes = weights
        return self.engine.load_weights(unpack_weights(arrays, dtypes), keepalive=arrays)

    def load_adapters(self, adapters: tuple) -> int:
        return self.engine.load_adapters(unpack_weights(*adapters))

    def generate(self, requests: Sequence[RolloutRequest], greedy: bool = False) -> list[RolloutResult]:
        return self.engine.generate(requests, greedy)


def connect_ray() -> bool:
    """Join Ray unless this process has: the cluster of RAY_ADDRESS, else a new local one (a local launcher's rank
    0). Returns whether a local instance was started here (to shut down at the end)."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address or "local", log_to_driver=False, **({} if address else {"include_dashboard": False}))
    return not address


def _ray_options(resources: Mapping[str, float]) -> dict:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    extra = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": resources.get("CPU", 0), "num_gpus": resources.get("GPU", 0), "resources": extra or None,
            "max_restarts": 0, "max_concurrency": 1,
            # beside the learner when its node has room; never in the Ray Train worker group's placement group
            "scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)}


class RayRollouts:
    """`workers` rollout workers and the latest weights they were given (see the module docstring)."""

    def __init__(self, spec: EngineSpec, workers: int, resources: Mapping[str, float], timeout_s: float):
        self.spec = spec
        self.workers = workers
        self.resources = dict(resources)
        self.timeout_s = timeout_s
        self.started_ray = connect_ray()
        self.actors: list = []
        self.weights_ref = None  # the latest full weights (LoRA: the base, published once)
        self.adapters_ref = None  # LoRA: the latest adapters
        self.restarts = 0

    # -- weights --------------------------------------------------------------------------------------------------
    @staticmethod
    def publish(state: Mapping[str, torch.Tensor]):
        """Put tensors in the object store once (from this process): (the reference, the bytes)."""
        import ray

        arrays, dtypes = pack_weights({n: t.detach() for n, t in state.items()})
        return ray.put((arrays, dtypes)), sum(a.nbytes for a in arrays.values())

    def _new_worker(self):
        import ray

        cls = ray.remote(RolloutWorker).options(**_ray_options(self.resources))
        return cls.remote(self.spec, self.weights_ref, self.adapters_ref)

    def _wait_ready(self, actors: list, what: str) -> None:
        import ray

        refs = [a.ready.remote() for a in actors]
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        if pending:
            raise RuntimeError(f"{len(pending)} of {len(refs)} rollout workers did not start within "
                               f"grpo.rollout_timeout_s = {self.timeout_s:g} s ({what}); each asks for "
                               f"grpo.rollout_resources = {self.resources}: is there room for them on the cluster?")
        ray.get(done)

    def start(self, weights: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor] | None) -> float:
        t0 = time.perf_counter()
        self.weights_ref, _ = self.publish(weights)
        if adapters is not None:
            self.adapters_ref, _ = self.publish(adapters)
        self.actors = [self._new_worker() for _ in range(self.workers)]
        self._wait_ready(self.actors, "starting")
        return time.perf_counter() - t0

    def sync(self, weights: Mapping[str, torch.Tensor] | None, adapters: Mapping[str, torch.Tensor] | None) -> int:
        """Publish the learner's new weights (or only its adapters) once and have every worker swap them in; a
        worker that fails meanwhile is replaced (from what was just published). Returns the bytes published."""
        moved = 0
        if weights is not None:
            self.weights_ref, n = self.publish(weights)
            moved += n
        if adapters is not None:
            self.adapters_ref, n = self.publish(adapters)
            moved += n
        calls = [("load_weights", self.weights_ref)] if weights is not None else []
        calls += [("load_adapters", self.adapters_ref)] if adapters is not None else []
        pending = [[getattr(a, method).remote(ref) for method, ref in calls] for a in self.actors]
        for i, refs in enumerate(pending):  # a replacement starts from what was just published: nothing to redo
            self._wait(i, refs, None, "sync")
        return moved

    # -- rounds ---------------------------------------------------------------------------------------------------
    def _wait(self, i: int, refs: list, resubmit, what: str):
        """The value of worker i's last ref; a dead or silent worker is replaced (the new one holds the latest
        weights) and, when `resubmit` is given, asked again with resubmit(new actor) -> refs, at most MAX_ATTEMPTS
        times in all."""
        import ray

        for attempt in range(MAX_ATTEMPTS):
            try:
                return ray.get(refs, timeout=self.timeout_s)[-1]
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                log.warning("rollout worker %d failed during %s (%s: %s); replacing it (attempt %d of %d)", i, what,
                            type(e).__name__, e, attempt + 1, MAX_ATTEMPTS)
                self._replace(i)
                if resubmit is None:
                    return None
                refs = resubmit(self.actors[i])
        raise RuntimeError(f"rollout worker {i} failed {MAX_ATTEMPTS} times in a row during {what}")

    def _replace(self, i: int) -> None:
        import ray

        ray.kill(self.actors[i], no_restart=True)
        self.actors[i] = self._new_worker()
        self._wait_ready([self.actors[i]], "replacing a failed one")
        self.restarts += 1

    def generate(self, requests: Sequence[RolloutRequest], greedy: bool = False,
                 group_size: int = 1) -> list[RolloutResult]:
        """The round's completions, each worker making a contiguous share of whole groups (a group's prompt is
        prefilled once per worker); a share whose worker fails is made again by its replacement."""
        groups = max(1, len(requests) // group_size)
        per = -(-groups // len(self.actors)) * group_size
        shares = [list(requests[k:k + per]) for k in range(0, len(requests), per)]
        refs = [self.actors[i].generate.remote(share, greedy) for i, share in enumerate(shares)]
        out: list[RolloutResult] = []
        for i, (share, ref) in enumerate(zip(shares, refs, strict=True)):
            out += self._wait(i, [ref], lambda a, s=share: [a.generate.remote(s, greedy)], "generation")
        return out

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        self.weights_ref = self.adapters_ref = None
        if self.started_ray:
            ray.shutdown()
