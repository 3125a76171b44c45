"""Every use of DeepSpeed internals, in one place.

The training backend drives DeepSpeed through its public API (`deepspeed.initialize`, the engine, and the
`safe_get_full_*` / `safe_set_full_*` state accessors). What it needs beyond that is here, checked by the test suite
against the versions in `TESTED_DEEPSPEED`; importing this module on an older DeepSpeed fails with a clear message,
and a newer one than tested logs a warning (MOE_PLATFORM_ALLOW_UNTESTED_DEEPSPEED=1 silences it).

- DeepSpeed reduces expert gradients over the expert-data-parallel group (and partitions ZeRO state per expert
  group) only for modules of its own MoE class: our MoE layer gets that class as an extra base (`make_moe_visible`).
- Its expert groups are created by private functions of `deepspeed.utils.groups` before `initialize`, and checked
  against our layout's (`create_expert_groups`).
- Loading one pipeline stage of an imported model needs the stage split before DeepSpeed builds the stages; it is
  computed with DeepSpeed's own balancing function (`partition_balanced`) and checked against the module's split.
- Restoring optimizer state into ZeRO's flat fp32 partitions re-links DeepSpeed's per-parameter views
  (`link_optimizer_fragments`), which it otherwise does only once after its first step.
- The pipeline engine's `eval_batch` adds each micro-batch's loss into the running total of the training loss,
  which only `train_batch` resets: a loss function that returns per-sequence numbers in eval (DPO's reference pass)
  resets that total around the call (`pipeline_eval_outputs`).
- Every DeepSpeed process on a CPU loads the shared-memory communication op it compiled once per machine, holding
  torch's build lock file for that moment; a process killed inside it (a preempted or killed rank) leaves the lock
  behind and every later process waits on it forever. `clear_stale_build_locks` removes such a lock before
  DeepSpeed's communication layer starts.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import deepspeed
from packaging.version import Version

TESTED_DEEPSPEED = (Version("0.16"), Version("0.19.99"))  # oldest, newest tested
ALLOW_UNTESTED_ENV = "MOE_PLATFORM_ALLOW_UNTESTED_DEEPSPEED"

log = logging.getLogger(__name__)


def check_deepspeed_version(version: str = deepspeed.__version__) -> None:
    v = Version(version.split("+")[0])
    if v < TESTED_DEEPSPEED[0]:
        raise ImportError(f"moe-platform needs DeepSpeed >= {TESTED_DEEPSPEED[0]}, and this environment has "
                          f"{version}: pip install -U 'deepspeed>={TESTED_DEEPSPEED[0]}'")
    if v > TESTED_DEEPSPEED[1] and os.environ.get(ALLOW_UNTESTED_ENV) != "1":
        log.warning("DeepSpeed %s is newer than the versions moe-platform is tested with (up to 0.19.x); its "
                    "internals used by moe_platform/deepspeed_compat.py may have changed", version)


check_deepspeed_version()

STALE_LOCK_SECONDS = 300  # a build of the op takes about a minute on 2 cores, a load of the built op milliseconds


def clear_stale_build_locks(root: Path | None = None, older_than: float = STALE_LOCK_SECONDS) -> list[Path]:
    """Remove the build lock of each of DeepSpeed's compiled ops (under torch's extension root, `root`) that is older
    than `older_than` seconds while its library is already built: no live process holds it that long. Returns the
    locks removed."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(root or get_default_build_root())
    removed = []
    for lock in root.glob("*/deepspeed_*/lock"):
        try:
            stale = time.time() - lock.stat().st_mtime > older_than and any(lock.parent.glob("*.so"))
            if stale:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:  # released meanwhile
            continue
    for lock in removed:
        log.warning("removed a stale build lock left by a killed process: %s", lock)
    return removed


def _groups_already_created(self, *args, **kwargs) -> None:
    """Our trainer creates DeepSpeed's expert groups (and checks them against our layout) before initialize."""


def make_moe_visible(model, moe_class: type | tuple[type, ...], ep_size: int) -> None:
    """Give every `moe_class` module of `model` (anything with `num_experts`) DeepSpeed's MoE layer class as an extra
    base, so the engine reduces its expert gradients over the expert-data-parallel group. Our layer keeps its own
    dispatch and grouped compute."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    cls_cache: dict[type, type] = {}
    for module in model.modules():
        if isinstance(module, moe_class) and not isinstance(module, DeepSpeedMoE):
            cls = type(module)
            if cls not in cls_cache:
                cls_cache[cls] = type(f"DeepSpeedVisible{cls.__name__}", (cls, DeepSpeedMoE),
                                      {"set_deepspeed_parallelism": _groups_already_created})
            module.__class__ = cls_cache[cls]
            module.ep_size = ep_size
            module.expert_group_name = f"ep_size_{ep_size}"
            module.num_local_experts = module.num_experts // ep_size


def create_expert_groups(ep: int, mpu=None, pipeline_module=None) -> list[int]:
    """Create DeepSpeed's expert-parallel and expert-data-parallel groups for `ep` (with tensor or pipeline
    parallelism through `mpu` or the pipeline module's grid); returns the ranks of this rank's expert group."""
    from deepspeed.utils import groups as ds_groups

    if pipeline_module is not None:
        ds_groups._create_expert_data_and_model_parallel(ep, mpu=pipeline_module._grid)
    elif mpu is not None:
        ds_groups._create_expert_data_and_model_parallel(ep, mpu=mpu)
    else:
        ds_groups._create_expert_and_data_parallel(ep)
    return list(ds_groups._get_expert_parallel_group_ranks(f"ep_size_{ep}"))


def zero_optimizer(optimizer):
    """DeepSpeed's ZeRO / bf16 optimizer wrapper when it keeps fp32 partitions, else None."""
    return optimizer if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state") else None


def flat_partitions(zo) -> list:
    """The flat fp32 partitions the wrapped optimizer steps."""
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(zo, attr):
            return getattr(zo, attr)
    raise RuntimeError(f"unsupported DeepSpeed optimizer {type(zo).__name__}")


def link_optimizer_fragments(zo) -> None:
    """(Re)build each parameter's views into the flat optimizer state. DeepSpeed links them once, right after
    stepping its first parameter group, so with several groups the later groups' views would stay empty."""
    zo._hp_optimizer_states_linked = False
    zo._lazy_init_hp_params_optimizer_state()


def partition_balanced(weights: list[int], num_parts: int) -> list[int]:
    """Stage boundaries as DeepSpeed's PipelineModule computes them for `partition_method="type:..."`."""
    from deepspeed.runtime.utils import partition_balanced as balanced

    return list(balanced(weights=weights, num_parts=num_parts))


def pipeline_eval_outputs(engine, micro_batches: list) -> list | None:
    """`PipelineEngine.eval_batch` giving the loss function's output of each micro-batch as it is (a list on the
    last stage, None on the others), whatever its shape: the engine's running loss total (`total_loss`, which every
    forward on the last stage adds to) is cleared before and after, so that outputs of another shape than the
    training loss neither fail that sum nor stay in it."""
    engine.total_loss = None
    try:
        return engine.eval_batch(data_iter=iter(micro_batches), num_micro_batches=len(micro_batches),
                                 reduce_output=None, bcast_loss=False)
    finally:
        engine.total_loss = None
