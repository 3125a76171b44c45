"""Every parallel layout trains like the single process: real multi-process gloo runs on DeepSpeed, compared per step
(loss) and at the end (every parameter), plus resharding a checkpoint across layouts bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_platform.checkpoint import latest_checkpoint
from moe_platform.checkpoint.sharded import ShardedReader
from moe_platform.config import load_config
from moe_platform.train.launch import launch_local
from moe_platform.train.metrics import MetricsLog
from tinyrun import (
    GROUPED_ARCHITECTURES,
    HF_ARCHITECTURES,
    run_events,
    save_tiny_hf_model,
    tiny_overrides,
    tiny_tokenizer,
    write_chat_jsonl,
)

STEPS = 10
COMMON = {"train.steps": STEPS, "train.global_batch_size": 8, "train.micro_batch_size": 2, "train.warmup": 2,
          "checkpoint.interval": 0, "checkpoint.export": "false", "train.eval_interval": 0}

LAYOUTS = {
    "dp2": dict(dp=2),
    "tp2": dict(tp=2),
    "pp2": dict(pp=2),
    "dp2-ep2": dict(dp=2, ep=2),
    "dp2-pp2": dict(dp=2, pp=2),
    "tp2-pp2": dict(tp=2, pp=2),
    "dp2-pp2-ep2": dict(dp=2, pp=2, ep=2),
    "dp2-tp2-pp2": dict(dp=2, tp=2, pp=2),
    "dp2-tp2-ep2": dict(dp=2, tp=2, ep=2),  # tensor-parallel experts inside expert parallelism on DeepSpeed
    "dp2-zero0": dict(dp=2, zero_stage=0),
    "dp2-zero2": dict(dp=2, zero_stage=2),
}
SLOW = {"dp2-tp2-pp2", "dp2-tp2-ep2"}


def config(corpus: Path, storage: Path, name: str, **extra):
    return load_config(None, tiny_overrides(corpus, storage, **{**COMMON, "run.name": name, **extra}))


def layout_overrides(degrees: dict) -> dict:
    return {f"parallel.{k}": v for k, v in degrees.items()}


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in MetricsLog(run_dir / "metrics.jsonl").read()]


def full_state(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    reader = ShardedReader(latest_checkpoint(run_dir))
    return {kind: reader.full_state_dict(kind) for kind in ("model", "exp_avg", "exp_avg_sq")}


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="module")
def reference(corpus_file, storage):
    result = launch_local(config(corpus_file, storage, "single"), progress=False)
    return losses(result.run_dir), full_state(result.run_dir)["model"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in LAYOUTS])
def test_layout_matches_single_process(name, corpus_file, storage, reference):
    result = launch_local(config(corpus_file, storage, name, **layout_overrides(LAYOUTS[name])), progress=False)
    assert_matches_reference(name, result, reference)


@pytest.mark.parametrize("name, mode", [("dp2-ep2", "selective"), ("tp2", "selective"), ("pp2", "full")])
def test_activation_checkpointing_on_layouts_matches_single_process(name, mode, corpus_file, storage, reference):
    """Recomputation inside expert all-to-all, tensor-parallel attention and pipeline stages trains as before."""
    result = launch_local(config(corpus_file, storage, f"{name}-ckpt-{mode}", **layout_overrides(LAYOUTS[name]),
                                 **{"train.activation_checkpointing": mode}), progress=False)
    assert_matches_reference(f"{name} with {mode} activation checkpointing", result, reference)


LORA = {"lora.enabled": "true", "lora.targets": "q_proj,k_proj,v_proj,o_proj,experts,shared_experts",
        "lora.rank": 4, "model.n_shared_experts": 1, "train.lr": 1e-2}


@pytest.fixture(scope="module")
def lora_reference(corpus_file, storage):
    result = launch_local(config(corpus_file, storage, "lora-single", **LORA), progress=False)
    return losses(result.run_dir), full_state(result.run_dir)["model"]


@pytest.mark.parametrize("name", ["dp2", "dp2-ep2", "tp2", "pp2"])
def test_lora_on_layouts_matches_single_process(name, corpus_file, storage, lora_reference):
    """Adapters on attention, routed and shared experts: expert adapters split with their experts under ep, the
    attention and shared-expert adapters with their projections' columns or rows under tp. Losses match within 1e-5
    as for full training. The adapters themselves within 1e-4: Adam divides each gradient by its own running size,
    and the adapters' gradients (products of two small factors, B starting at zero) are small enough that the
    layouts' different summation orders leave ~1e-4 relative differences in them after ten steps at lr 1e-2."""
    result = launch_local(config(corpus_file, storage, f"lora-{name}", **LORA, **layout_overrides(LAYOUTS[name])),
                          progress=False)
    assert_matches_reference(f"LoRA at {name}", result, lora_reference, param_atol=1e-4)


def test_lora_run_resizes_to_one_process(corpus_file, storage, lora_reference):
    """An elastic resize of a LoRA run, dp2·ep2 -> one process: the adapters, their optimizer states and the frozen
    base reshard bit for bit, and training goes on with the single-process losses."""
    cfg = lambda degrees: config(corpus_file, storage, "lora-resize", **LORA, **layout_overrides(degrees))  # noqa: E731
    first = launch_local(cfg(dict(dp=2, ep=2)), progress=False, stop_after=STEPS // 2)
    original = full_state(first.run_dir)
    resized = launch_local(cfg(dict()), progress=False, stop_after=STEPS // 2)
    assert resized.resumed_from == STEPS // 2
    again = full_state(resized.run_dir)
    for kind, tensors in original.items():
        assert again[kind].keys() == tensors.keys()
        assert all(torch.equal(again[kind][k], v) for k, v in tensors.items()), f"{kind} changed resizing"
    final = launch_local(cfg(dict()), progress=False)
    assert final.final_step == STEPS
    gaps = [abs(a - b) / abs(b) for a, b in zip(losses(final.run_dir), lora_reference[0], strict=True)]
    assert max(gaps) <= 1e-5, gaps


def assert_matches_reference(name: str, result, reference, param_atol: float = 1e-5) -> None:
    ref_losses, ref_params = reference
    got = losses(result.run_dir)
    assert len(got) == STEPS
    gaps = [abs(a - b) / abs(b) for a, b in zip(got, ref_losses, strict=True)]
    assert max(gaps) <= 1e-5, f"{name}: per-step relative loss gaps {gaps}"
    params = full_state(result.run_dir)["model"]
    assert params.keys() == ref_params.keys()
    for key, value in ref_params.items():
        torch.testing.assert_close(params[key], value, rtol=0, atol=param_atol, msg=f"{name}: parameter {key}")


def assert_reshards_bitwise(cfg, original: dict, layouts) -> None:
    """Resume the run saved at step STEPS // 2 on each layout (`cfg(degrees)`): the same full parameters, buffers
    and optimizer states, bit for bit."""
    for degrees in layouts:
        result = launch_local(cfg(degrees), progress=False, stop_after=STEPS // 2)
        assert result.resumed_from == STEPS // 2
        again = full_state(result.run_dir)
        for kind, tensors in original.items():
            assert again[kind].keys() == tensors.keys()
            for key, value in tensors.items():
                assert torch.equal(again[kind][key], value), f"{kind} {key} changed resharding to {degrees}"


def test_resharding_is_bitwise_and_training_continues(corpus_file, storage, reference):
    """Save at dp2·pp2·ep2, load at tp2, dp4, one rank and back: the same full parameters and optimizer states,
    bit for bit; then training on continues with the single-process losses."""
    ref_losses, _ = reference
    save_at = dict(dp=2, pp=2, ep=2)
    cfg = lambda degrees: config(corpus_file, storage, "reshard", **layout_overrides(degrees))  # noqa: E731
    first = launch_local(cfg(save_at), progress=False, stop_after=STEPS // 2)
    original = full_state(first.run_dir)
    assert_reshards_bitwise(cfg, original, (dict(tp=2), dict(dp=4), dict(), save_at))
    final = launch_local(cfg(dict(dp=2, ep=2)), progress=False)
    assert final.final_step == STEPS
    got = losses(final.run_dir)
    gaps = [abs(a - b) / abs(b) for a, b in zip(got, ref_losses, strict=True)]
    assert max(gaps) <= 1e-5, gaps


@pytest.mark.parametrize("degrees, match", [
    (dict(dp=3, ep=3), r"num_experts \(4\) must be divisible by ep \(3\)"),
    (dict(tp=3), r"divisible by tp"),
    (dict(pp=4), r"n_layers \(2\) must be >= pp \(4\)"),
])
def test_impossible_layout_is_refused_before_any_process_starts(degrees, match, corpus_file, storage):
    cfg = config(corpus_file, storage, "bad", **layout_overrides(degrees), **{"train.global_batch_size": 12,
                                                                            "train.micro_batch_size": 1})
    with pytest.raises(ValueError, match=match) as err:
        launch_local(cfg, progress=False)
    assert "valid layouts" in str(err.value).lower()
    assert not (storage / "bad").exists(), "nothing may be written for a refused layout"


# fp16 on several ranks runs DeepSpeed's fp16 engine, which starts only where the device has fp16 kernels: a GPU, or
# a CPU with AVX512-FP16 or AMX-FP16 (oneDNN's answer, `fp16_kernels`). Which one of the two tests below runs is the
# machine's; tests/unit/test_trainer.py checks the decision both ways on any machine.
def _cpu_fp16_kernels() -> tuple[bool, str]:
    from moe_platform.train.backends import fp16_kernels

    return fp16_kernels()


def test_fp16_on_several_cpu_ranks_is_refused_before_any_process_starts(corpus_file, storage):
    supported, device = _cpu_fp16_kernels()
    if supported:
        pytest.skip(f"this {device} has fp16 kernels (AVX512-FP16/AMX-FP16), so DeepSpeed runs fp16 here: "
                    "test_fp16_on_several_cpu_ranks_matches_one_process checks that instead")
    cfg = config(corpus_file, storage, "fp16-dp2", **layout_overrides({"dp": 2}), **{"train.precision": "fp16"})
    with pytest.raises(ValueError, match=r"'fp16' on 2 ranks runs DeepSpeed's fp16 engine, which this cpu device"):
        launch_local(cfg, progress=False)
    assert not (storage / "fp16-dp2").exists()


def test_fp16_on_several_cpu_ranks_matches_one_process(corpus_file, storage):
    """Where the CPU has fp16 kernels, dp2 on DeepSpeed's fp16 engine (fp16 weights, fp32 master copies) trains like
    one process under fp16 autocast: per-step losses within 5e-5 (measured <= 7.3e-6 on a Sapphire Rapids CPU; fp16
    rounds each value at 4.9e-4, so another CPU's kernels may move the sums a little more; measured too: one step
    skipped in one run and applied in the other parts them by 5.7e-3 at once), the same loss scale at every
    step and no overflow at the default initial scale. (With overflows the two differ by design: DeepSpeed's
    hysteresis of 2 lets one overflow pass before it halves, and fp16 weight gradients overflow at a smaller scale
    than autocast's fp32 ones.)"""
    supported, device = _cpu_fp16_kernels()
    if not supported:
        pytest.skip(f"this {device} device has no fp16 kernels (needs AVX512-FP16 or AMX-FP16): DeepSpeed refuses "
                    "fp16 here, and test_fp16_on_several_cpu_ranks_is_refused_before_any_process_starts checks that")
    runs = {}
    for name, degrees in (("fp16-single", {}), ("fp16-dp2", {"dp": 2})):
        result = launch_local(config(corpus_file, storage, name, **layout_overrides(degrees),
                                     **{"train.precision": "fp16"}), progress=False)
        runs[name] = MetricsLog(result.run_dir / "metrics.jsonl").read()
    one, two = runs["fp16-single"], runs["fp16-dp2"]
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    assert [r["loss_scale"] for r in two] == [r["loss_scale"] for r in one] == [2.0 ** 16] * STEPS
    assert not any(r["overflow"] for r in one + two) and one[-1]["skipped_steps"] == two[-1]["skipped_steps"] == 0
    gaps = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(one, two, strict=True)]
    assert max(gaps) <= 5e-5, gaps
    assert two[-1]["loss"] < two[0]["loss"] - 0.1, "fp16 on two ranks did not train"


def test_layouts_part_only_where_a_routing_choice_flips(corpus_file, storage):
    """Why long runs at different layouts drift apart (docs/operations.md, "Resized runs and bitwise equality"): data
    parallelism sums gradients in another order, which moves losses by ~1e-7 to 1e-6. That stays so until a router
    logit near a tie rounds the other way and one token's top-k experts change; from that step on the runs take
    different paths. Measured here (lr 1e-2, where a flip comes early): identical routing and gaps within the 1e-5
    parity bar up to that step, and a gap above 1e-4 after it."""
    extra = {"train.steps": 120, "train.lr": 1e-2, "train.global_batch_size": 12, "train.micro_batch_size": 2}
    runs = {}
    for name, degrees in (("drift-1", {}), ("drift-dp2", dict(dp=2))):
        result = launch_local(config(corpus_file, storage, name, **extra, **layout_overrides(degrees)), progress=False)
        runs[name] = MetricsLog(result.run_dir / "metrics.jsonl").read()
    one, two = runs["drift-1"], runs["drift-dp2"]
    flips = [a["step"] for a, b in zip(one, two, strict=True) if a["tokens_per_expert"] != b["tokens_per_expert"]]
    assert flips, "routing never differed: the drift this test explains did not happen"
    gaps = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(one, two, strict=True)]
    first = flips[0]
    assert max(gaps[: first - 1]) <= 1e-5, f"the runs parted before routing did (step {first}): {gaps[:first]}"
    assert max(gaps[first - 1:]) > 1e-4, "after the routing flip the runs should part"


# Imported Hugging Face models train on every layout like on one process. The layouts split what each architecture
# adds: q/k/v biases and the gated shared expert under tensor parallelism (Qwen2-MoE), per-head q/k norms (Qwen3-MoE),
# a norm over the whole projection under expert and pipeline parallelism (OLMoE; tensor parallelism refuses it).
# DeepSeek-V3/V2 and GLM-4.5 (10 steps each): latent attention split by heads under tp (its down-projections and
# their norms replicated, o_proj's bias added once), a dense first layer and an MoE layer on different pipeline
# stages (the dense stage holds the expert placeholder under ep), grouped sigmoid routing whose correction bias moves
# with the loads of every rank.
IMPORT_LAYOUTS = {arch: ["dp2-ep2", "pp2"] + ([] if arch == "OlmoeForCausalLM" else ["tp2"])
                  for arch in HF_ARCHITECTURES if arch not in GROUPED_ARCHITECTURES}
IMPORT_LAYOUTS.update({arch: ["dp2-ep2", "tp2", "pp2", "dp2-pp2-ep2"] for arch in GROUPED_ARCHITECTURES})
# gpt-oss (10 steps): sinks split with their heads, o_proj's and the experts' output biases added once under tp,
# the expert biases split with their experts under ep, sliding-window and full layers on different stages.
IMPORT_LAYOUTS["GptOssForCausalLM"] = ["dp2-ep2", "tp2", "pp2"]
TEN_STEPS = (*GROUPED_ARCHITECTURES, "GptOssForCausalLM")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    tok = tiny_tokenizer(tmp_path_factory.mktemp("hf-tok"))
    return {arch: save_tiny_hf_model(arch, tmp_path_factory.mktemp(arch), tok)[1] for arch in HF_ARCHITECTURES}


def bytes_read_per_rank(run_dir: Path) -> tuple[list[int], int]:
    """What each rank read of the imported model directory at the start of the run (the start event records it)."""
    start = next(e for e in run_events(run_dir) if e["event"] == "start")
    return start["imported"]["bytes_read"], start["imported"]["model_bytes"]


def expert_bytes(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            total += sum(f.get_slice(k)[:].nbytes for k in f.keys() if ".experts." in k)
    return total


@pytest.mark.parametrize("arch", HF_ARCHITECTURES)
def test_imported_models_train_on_layouts_like_one_process(arch, hf_models, corpus_file, storage):
    """Imported models train on every layout like one process, reading the sharded model directory lazily: each
    rank reads only the tensors, and the slices of tensors,
    its position owns (counted per rank), and never the whole model unless it is the only rank."""
    extra = {"init.from_hf": str(hf_models[arch]), "train.steps": STEPS if arch in TEN_STEPS else 2}
    single = launch_local(config(corpus_file, storage, f"{arch}-single", **extra), progress=False).run_dir
    ref = losses(single)
    (one,), total = bytes_read_per_rank(single)
    assert one == total, "one process reads every weight exactly once"
    experts = expert_bytes(hf_models[arch])
    for name in IMPORT_LAYOUTS[arch]:
        result = launch_local(config(corpus_file, storage, f"{arch}-{name}", **extra,
                                     **layout_overrides(LAYOUTS[name])), progress=False)
        gaps = [abs(a - b) / abs(b) for a, b in zip(losses(result.run_dir), ref, strict=True)]
        assert max(gaps) <= 1e-5, f"{arch} at {name}: per-step relative loss gaps {gaps}"
        read, _ = bytes_read_per_rank(result.run_dir)
        assert max(read) < total, f"{arch} at {name}: a rank read the whole model ({read} of {total} bytes)"
        if name == "dp2-ep2":  # dense weights on both ranks, half of the experts each
            assert read == [total - experts // 2] * 2, (read, total, experts)
        elif name == "pp2":  # each stage its own layers: together exactly the model
            assert sum(read) == total, (read, total)
        elif name == "tp2":  # shards of attention and experts, the rest replicated
            assert read[0] == read[1] and total < sum(read) < 2 * total, (read, total)
        else:  # dp2-pp2-ep2: each stage's data-parallel pair reads its layers, half of the experts each
            assert sum(read) == 2 * total - experts, (read, total, experts)


def test_a_deepseek_checkpoint_reshards_bitwise_and_training_continues(hf_models, corpus_file, storage):
    """A DeepSeek-V3 run saved at dp2·pp2·ep2 (a dense stage with its expert placeholder, an MoE stage) loads at tp2
    (latent attention split by heads) and on one process with the same parameters, routing correction biases and
    optimizer states bit for bit, and training goes on at tp2 with the single-process losses."""
    extra = {"init.from_hf": str(hf_models["DeepseekV3ForCausalLM"]), "train.steps": STEPS}
    ref = losses(launch_local(config(corpus_file, storage, "dsv3-ref", **extra), progress=False).run_dir)
    cfg = lambda degrees: config(corpus_file, storage, "dsv3-reshard", **extra, **layout_overrides(degrees))  # noqa
    first = launch_local(cfg(dict(dp=2, pp=2, ep=2)), progress=False, stop_after=STEPS // 2)
    original = full_state(first.run_dir)
    assert any(k.endswith("mlp.gate.expert_bias") for k in original["model"]), "the correction bias is saved"
    assert_reshards_bitwise(cfg, original, (dict(tp=2), dict()))
    final = launch_local(cfg(dict(tp=2)), progress=False)
    assert final.final_step == STEPS
    gaps = [abs(a - b) / abs(b) for a, b in zip(losses(final.run_dir), ref, strict=True)]
    assert max(gaps) <= 1e-5, gaps


def test_lora_on_latent_attention_trains_on_layouts_like_one_process(hf_models, corpus_file, storage):
    """LoRA on every latent-attention projection, the dense layer's MLP and the experts of DeepSeek-V3: under tp the
    up-projections' adapters split with their heads and the down-projections' stay replicated with their gradients
    summed; under dp2·pp2·ep2 the expert adapters split over ep and the dense stage holds the expert placeholder."""
    extra = {"init.from_hf": str(hf_models["DeepseekV3ForCausalLM"]), "lora.enabled": "true", "lora.rank": 4,
             "lora.targets": "attention,dense_mlp,experts", "train.lr": 1e-2}
    ref = losses(launch_local(config(corpus_file, storage, "dsv3-lora", **extra), progress=False).run_dir)
    for name in ("tp2", "dp2-pp2-ep2"):
        got = losses(launch_local(config(corpus_file, storage, f"dsv3-lora-{name}", **extra,
                                         **layout_overrides(LAYOUTS[name])), progress=False).run_dir)
        gaps = [abs(a - b) / abs(b) for a, b in zip(got, ref, strict=True)]
        assert max(gaps) <= 1e-5, f"LoRA on DeepSeek-V3 at {name}: per-step relative loss gaps {gaps}"


def test_a_whole_projection_norm_refuses_tensor_parallelism(hf_models, corpus_file, storage):
    cfg = config(corpus_file, storage, "olmoe-tp2", **{"init.from_hf": str(hf_models["OlmoeForCausalLM"])},
                 **layout_overrides({"tp": 2}))
    with pytest.raises(ValueError, match=r"model.qk_norm = 'full' \(OLMoE\) normalises over every attention head"):
        launch_local(cfg, progress=False)
    assert not (storage / "olmoe-tp2").exists(), "refused before anything is written"


def test_chat_data_trains_on_layouts_like_one_process(tmp_path_factory, storage):
    """Packed conversations (per-document attention, loss on assistant tokens only, averaged over the counted tokens
    of the whole global batch) give the single-process losses on data, expert, tensor and pipeline parallel layouts,
    although each rank's micro-batches hold different numbers of counted tokens."""
    rows = write_chat_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", rows=40)
    extra = {"data.format": "chat", "train.seq_len": 128, "model.max_seq_len": 128, "train.steps": 3}
    ref = losses(launch_local(config(rows, storage, "chat-single", **extra), progress=False).run_dir)
    for name in ("dp2-ep2", "tp2", "pp2"):
        result = launch_local(config(rows, storage, f"chat-{name}", **extra, **layout_overrides(LAYOUTS[name])),
                              progress=False)
        gaps = [abs(a - b) / abs(b) for a, b in zip(losses(result.run_dir), ref, strict=True)]
        assert max(gaps) <= 1e-5, f"chat data at {name}: per-step relative loss gaps {gaps}"
