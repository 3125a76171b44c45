"""Single-process training: exact resume, metrics, export, damaged checkpoints, bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch

from moe_platform.checkpoint import latest_checkpoint, list_checkpoints
from moe_platform.cli import main as cli_main
from moe_platform.train.metrics import MetricsLog
from moe_platform.train.trainer import Trainer, train


def run(cfg, stop_after=None):
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    result = trainer.fit(stop_after=stop_after)
    return trainer, result


def params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("balancing", ["aux_loss", "bias"])
def test_exact_resume_is_bitwise(tiny_config, tmp_path, balancing):
    """40 steps straight == 20 steps, stop, resume for 20: same parameters bit for bit and the same losses."""
    common = {"train.steps": 40, "checkpoint.interval": 20, "model.balancing": balancing, "train.warmup": 5}
    straight, _ = run(tiny_config(**common, **{"run.name": "straight"}))
    first, r1 = run(tiny_config(**common, **{"run.name": "resumed"}), stop_after=20)
    assert r1.final_step == 20 and r1.export_dir is None
    second, r2 = run(tiny_config(**common, **{"run.name": "resumed"}))
    assert r2.resumed_from == 20 and r2.final_step == 40
    a, b = params(straight), params(second)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    la = [(r["step"], r["loss"], r["aux_loss"]) for r in straight.metrics.read()]
    lb = [(r["step"], r["loss"], r["aux_loss"]) for r in second.metrics.read()]
    assert la == lb and [s for s, _, _ in lb] == list(range(1, 41))


def test_metrics_export_and_files(tiny_config):
    cfg = tiny_config(**{"train.eval_interval": 6})
    trainer, result = run(cfg)
    recs = MetricsLog(result.run_dir / "metrics.jsonl").read()
    assert [r["step"] for r in recs] == list(range(1, 13))
    for key in ("step", "loss", "aux_loss", "lr", "tokens_per_s", "mfu", "expert_imbalance"):
        assert all(key in r and r[key] == r[key] for r in recs), key
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert any("val_loss" in r for r in recs)
    assert (result.run_dir / "loss.png").stat().st_size > 1000
    assert len(list_checkpoints(result.run_dir)) == cfg.checkpoint.keep
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(result.export_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(result.export_dir)
    ids = tok("To be, or not to be", return_tensors="pt").input_ids
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, trainer.model(ids), rtol=1e-5, atol=1e-5)


def test_corrupt_latest_checkpoint_falls_back(tiny_config):
    cfg = tiny_config(**{"checkpoint.interval": 4, "checkpoint.keep": 3, "train.steps": 12})
    _, result = run(cfg, stop_after=8)
    newest = latest_checkpoint(result.run_dir)
    assert newest.name.endswith("08")
    weights = newest / "shards" / "rank0.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="sha256|corrupt"):
        trainer, result = run(cfg)
    assert result.resumed_from == 4 and result.final_step == 12
    steps = [r["step"] for r in trainer.metrics.read()]
    assert steps == list(range(1, 13)), "steps after the fallback point are redone exactly once"


def test_checkpoint_of_another_model_config_is_refused(tiny_config):
    run(tiny_config(), stop_after=6)
    with pytest.raises(ValueError, match="different model config"):
        run(tiny_config(**{"model.num_experts": 8}))


def test_unwritable_storage_is_a_clear_error(tiny_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        train(tiny_config(**{"run.storage_path": str(blocker / "sub")}), progress=False)


def test_cli_export_of_any_checkpoint(tiny_config, tmp_path, capsys):
    _, result = run(tiny_config(), stop_after=6)
    ckpt = latest_checkpoint(result.run_dir)
    assert cli_main(["export", str(ckpt), str(tmp_path / "exp")]) == 0
    cfg = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and os.path.exists(tmp_path / "exp" / "tokenizer.json")
    assert cli_main(["export", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "error" in capsys.readouterr().err


def test_zero_learning_rate_leaves_the_weights_unchanged(tiny_config):
    """train.lr = 0 is a frozen run (an import/export round trip): every step runs, with gradients and optimizer
    state, and no weight moves, weight decay included (AdamW's decay is scaled by the learning rate too)."""
    cfg = tiny_config(**{"train.lr": 0, "train.steps": 4, "train.warmup": 1, "train.weight_decay": 0.1,
                         "checkpoint.interval": 0, "checkpoint.export": "false"})
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    start = params(trainer)
    trainer.fit()
    logged = trainer.metrics.read()
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and all(r["lr"] == 0.0 for r in logged)
    assert all(r["grad_norm"] > 0 for r in logged), "the steps computed no gradient"
    moments = [s["exp_avg"] for s in trainer.backend.optimizer.state.values()]
    assert moments and any(m.abs().sum() > 0 for m in moments), "the optimizer never stepped"
    end = params(trainer)
    assert end.keys() == start.keys()
    changed = [k for k in start if not torch.equal(start[k], end[k])]
    assert changed == [], f"lr = 0 moved {changed}"


@pytest.mark.parametrize("precision, world, kernels, refused", [
    ("fp16", 2, (False, "cpu"), True),  # DeepSpeed's fp16 engine would refuse this device: refused up front
    ("fp16", 4, (True, "cpu"), False),  # a CPU with AVX512-FP16/AMX-FP16 (or a GPU) runs it
    ("fp16", 1, (False, "cpu"), False),  # one process: torch.amp's GradScaler, no DeepSpeed
    ("bf16", 2, (False, "cpu"), False),
])
def test_fp16_on_several_ranks_needs_fp16_kernels(tiny_config, precision, world, kernels, refused):
    """The decision of `check_precision` both ways, whatever this machine's CPU has (the distributed tests run the
    branch this machine takes)."""
    from moe_platform.train.backends import check_precision, fp16_kernels

    cfg = tiny_config(**{"train.precision": precision})
    if refused:
        with pytest.raises(ValueError, match=r"train\.precision = 'fp16' on 2 ranks runs DeepSpeed's fp16 engine, "
                                             r"which this cpu device does not support \(no fp16 kernels; on CPU they "
                                             r"need AVX512-FP16 or AMX-FP16\)"):
            check_precision(cfg, world, kernels)
    else:
        check_precision(cfg, world, kernels)
    supported, device = fp16_kernels()  # this machine's answer, asked of DeepSpeed's accelerator
    assert isinstance(supported, bool) and device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_fp16_skips_and_counts_overflow_steps_and_resumes_bitwise(tiny_config):
    """fp16 with dynamic loss scaling: a scale of 2**24 overflows, so the first steps are skipped (the weights do not
    move), counted in metrics.jsonl and halve the scale until it fits; after that the run trains. The scale and the
    count are part of the checkpoint: a resumed run continues bit for bit."""
    common = {"train.precision": "fp16", "train.fp16_initial_scale_power": 24, "train.steps": 12,
              "checkpoint.interval": 6, "train.warmup": 2, "checkpoint.export": "false"}
    trainer = Trainer(tiny_config(**common, **{"run.name": "fp16"}), progress=False)
    trainer.setup()
    start = params(trainer)
    first = trainer.train_step()
    assert first["overflow"] and first["skipped_steps"] == 1 and first["loss_scale"] == 2.0 ** 23
    assert all(torch.equal(v, start[k]) for k, v in params(trainer).items()), "an overflow step changed weights"
    trainer.fit()
    logged = trainer.metrics.read()
    skipped = logged[-1]["skipped_steps"]  # logged: steps 2..12 (step 1 ran above)
    assert skipped == 1 + sum(r["overflow"] for r in logged) and 1 < skipped < 12, [r["loss_scale"] for r in logged]
    assert not logged[-1]["overflow"] and logged[-1]["loss"] < logged[skipped - 1]["loss"], "it trains once it fits"
    first, r1 = run(tiny_config(**common, **{"run.name": "fp16-resumed"}), stop_after=6)
    second, r2 = run(tiny_config(**common, **{"run.name": "fp16-resumed"}))
    assert r2.resumed_from == 6
    assert all(torch.equal(v, params(trainer)[k]) for k, v in params(second).items())
    assert [(r["loss"], r["loss_scale"], r["skipped_steps"]) for r in second.metrics.read()[1:]] == [
        (r["loss"], r["loss_scale"], r["skipped_steps"]) for r in logged]
