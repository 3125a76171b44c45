"""Training on CUDA in bf16 and in fp16 with dynamic loss scaling, against the CPU fp32 run of the same config: the
first step's loss, and training that goes on (fp16 overflow steps skipped and counted). Skipped without CUDA."""

from __future__ import annotations

import pytest

from moe_platform.train.trainer import Trainer

pytestmark = pytest.mark.gpu


def first_steps(cfg, n: int = 6) -> list[dict]:
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    return [trainer.train_step() for _ in range(n)]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_training_matches_cpu_fp32(tiny_config, precision):
    common = {"train.steps": 6, "train.warmup": 1, "checkpoint.interval": 0}
    ref = first_steps(tiny_config(**common, **{"run.name": "cpu", "train.device": "cpu", "train.precision": "fp32"}))
    got = first_steps(tiny_config(**common, **{"run.name": f"cuda-{precision}", "train.device": "cuda",
                                               "train.precision": precision}))
    assert abs(got[0]["loss"] - ref[0]["loss"]) <= 0.02 * ref[0]["loss"], (got[0]["loss"], ref[0]["loss"])
    if precision == "fp16":
        assert got[-1]["skipped_steps"] == sum(r["overflow"] for r in got)
    applied = [r for r in got if not r.get("overflow")]
    assert applied and applied[-1]["loss"] < got[0]["loss"], "training did not move on the GPU"
