"""gpt-oss: MXFP4 expert weights (dequantized on import, each rank reading only its own experts' blocks), what the
architecture computes beyond the others (attention sinks, sliding-window layers, biases on every projection, the
router and the experts, the clamped SwiGLU), and its export. The bf16/fp32 directory's logits, greedy generation on
a prompt longer than the window and bitwise export are in test_hf_import.py with every architecture."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from moe_platform.checkpoint.hf import HFWeights, export_hf, load_hf
from moe_platform.checkpoint.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from moe_platform.model.transformer import MoETransformer
from tinyrun import save_tiny_hf_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(the transformers model, its fp32 directory)."""
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return save_tiny_hf_model("GptOssForCausalLM", tmp_path_factory.mktemp("oss"), tok)


@pytest.fixture(scope="module")
def mxfp4_dir(model, tmp_path_factory):
    """The same model as gpt-oss publishes its checkpoints: the experts' two weights as MXFP4 blocks and scales of
    the (E, 2I, D) and (E, D, I) matrices (quantized here by our own quantizer), everything else as it was, and a
    quantization_config saying so."""
    _, src = model
    out = tmp_path_factory.mktemp("oss-mxfp4")
    state = {}
    for f in src.glob("*.safetensors"):
        state.update(load_file(f))
    tensors = {}
    for name, t in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # disk layout (E, in, out): transpose
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = quantize_mxfp4(t.transpose(1, 2).contiguous())
        else:
            tensors[name] = t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copyfile(f, out / f.name)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_mxfp4_dequantization_is_the_formula_and_transformers():
    """Two values per byte (low nibble first), e2m1 magnitudes 0..6 with a sign bit, times 2^(scale - 127) per block
    of 32; transformers' own dequantization gives the same bits; our quantizer round-trips e2m1 values exactly."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks = torch.zeros(1, 1, 1, 16, dtype=torch.uint8)
    blocks[..., 0] = 0x2 | (0xF << 4)  # 1.0, then -6.0
    blocks[..., 1] = 0x7 | (0x9 << 4)  # 6.0, then -0.5
    scales = torch.tensor([[[127 + 3]]], dtype=torch.uint8)  # x 2^3
    got = dequantize_mxfp4(blocks, scales)
    assert got[0, 0, :4].tolist() == [8.0, -48.0, 48.0, -4.0] and got[0, 0, 4:].abs().sum() == 0
    w = torch.randn(4, 6, 64, generator=torch.Generator().manual_seed(0))
    b, s = quantize_mxfp4(w)
    assert b.shape == (4, 6, 2, 16) and s.shape == (4, 6, 2) and b.dtype == s.dtype == torch.uint8
    ours = dequantize_mxfp4(b, s)
    assert torch.equal(ours.transpose(1, 2), convert_moe_packed_tensors(b, s, dtype=torch.float32))
    assert (ours - w).abs().max() <= w.abs().amax() / 4  # half the widest e2m1 step at the block's scale
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(ours)), ours)


def test_an_mxfp4_checkpoint_imports_with_transformers_logits(mxfp4_dir, tmp_path):
    """The MXFP4 directory imports with the logits transformers computes from it (its dequantizing loader), and
    exports as plain float safetensors that transformers loads as GptOssForCausalLM, with the same logits."""
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        mxfp4_dir, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    args, state = load_hf(mxfp4_dir)
    ours = MoETransformer(args)
    ours.load_state_dict(state, strict=True)
    tokens = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(tokens).logits
        torch.testing.assert_close(ours.eval()(tokens), want, rtol=1e-5, atol=1e-5)
    export_hf(state, args, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == ["GptOssForCausalLM"] and "quantization_config" not in config
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("degrees", [dict(dp=2, ep=2), dict(tp=2), dict(dp=2, tp=2, ep=2)])
def test_each_rank_reads_only_its_own_mxfp4_blocks(mxfp4_dir, degrees):
    """A rank's share of the experts (its experts under ep, its gate/up rows, one run of interleaved disk rows, and
    down columns under tp) comes from the MXFP4 blocks and scales of those experts and rows alone."""
    from moe_platform.parallel.layout import Layout, ProcessGroups
    from moe_platform.parallel.placement import full_shapes, local_shard_spec

    args, full = load_hf(mxfp4_dir)
    layout = Layout(**degrees)
    experts = [n for n in full if ".mlp.experts." in n and not n.endswith("_bias")]
    whole = HFWeights(mxfp4_dir)
    expert_disk_bytes = sum(whole._nbytes(n) for n in whole._file_of if n.endswith(("_blocks", "_scales")))
    for rank in range(layout.world_size):
        groups = ProcessGroups(layout, rank)
        weights = HFWeights(mxfp4_dir)
        for name in experts:
            spec = local_shard_spec(name, full_shapes(args)[name], groups)
            assert torch.equal(weights.read(name, spec), spec.extract(full[name])), f"rank {rank}: {name}"
        share = layout.ep * layout.tp
        assert weights.bytes_read == expert_disk_bytes // share, (rank, weights.bytes_read, expert_disk_bytes)


@pytest.mark.parametrize("change, match", [
    (lambda t: {**t, "model.layers.0.mlp.experts.down_proj_blocks": t["model.layers.0.mlp.experts.down_proj_blocks"]
                [..., :15].contiguous()},
     r"down_proj_blocks: MXFP4 blocks \(8, 64, 2, 15\) and scales \(8, 64, 2\) do not match"),
    (lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.experts.gate_up_proj_scales"},
     r"model.layers.1.mlp.experts.gate_up_proj has MXFP4 blocks or scales without the other half"),
    (lambda t: {**t, "model.layers.0.mlp.experts.down_proj_scales": t["model.layers.0.mlp.experts.down_proj_scales"]
                .to(torch.int16)}, r"MXFP4 blocks and scales must be uint8, got torch.uint8 and torch.int16"),
])
def test_bad_mxfp4_tensors_are_clear_errors(mxfp4_dir, tmp_path, change, match):
    shutil.copytree(mxfp4_dir, tmp_path / "bad")
    tensors = change(load_file(mxfp4_dir / "model.safetensors"))
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(ValueError, match=match):
        load_hf(tmp_path / "bad")


def test_a_quantization_we_do_not_dequantize_is_refused(model, tmp_path):
    _, src = model
    shutil.copytree(src, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"GptOssForCausalLM with quantization_config = \{'quant_method': 'fp8'\}"):
        load_hf(tmp_path / "m")


@pytest.mark.parametrize("change", [{"attention_sinks": False}, {"sliding_layers": ""}, {"router_bias": False},
                                    {"expert_bias": False}, {"expert_activation": "swiglu"}, {"o_proj_bias": False}])
def test_every_gpt_oss_feature_matters(model, change):
    """The parity with transformers is not an accident of a feature left unused: computing without any one of them
    (its tensors kept, or dropped) moves the logits."""
    hf, src = model
    args, state = load_hf(src)
    plain = MoETransformer(dataclasses.replace(args, **change))
    plain.load_state_dict(state, strict=False)
    tokens = torch.randint(0, args.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (plain.eval()(tokens) - hf(tokens).logits).abs().max() > 1e-3


def test_the_clamp_of_the_swiglu_is_computed_as_transformers_does(tokenizer_dir_for_clamp, tmp_path):
    """A model whose experts' pre-activations mostly pass the clamp (swiglu_limit 0.5): transformers' logits, and
    not those of the same model without the clamp."""
    import tinyrun

    base = tinyrun.hf_config
    tinyrun.hf_config = lambda a, v: type(base(a, v))(**(base(a, v).to_dict() | {"swiglu_limit": 0.5}))
    try:
        hf, out = save_tiny_hf_model("GptOssForCausalLM", tmp_path / "m", tokenizer_dir_for_clamp)
    finally:
        tinyrun.hf_config = base
    args, state = load_hf(out)
    assert args.swiglu_limit == 0.5
    tokens = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(tokens).logits
        for limit, close in ((0.5, True), (1e4, False)):
            model = MoETransformer(dataclasses.replace(args, swiglu_limit=limit))
            model.load_state_dict(state, strict=True)
            gap = (model.eval()(tokens) - want).abs().max()
            assert (gap <= 1e-5 * want.abs().max()) == close, (limit, gap)


@pytest.fixture(scope="module")
def tokenizer_dir_for_clamp(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok-clamp"))


def test_a_gpt_oss_run_resumes_bit_for_bit(model, tiny_config):
    """Sinks, biases and the clamped experts train and resume from a checkpoint with the same weights and losses as
    a run that never stopped."""
    from moe_platform.train.trainer import Trainer

    _, src = model
    common = {"init.from_hf": str(src), "train.steps": 4, "checkpoint.interval": 2, "checkpoint.async_save": "false"}

    def run(name: str, stop_after: int | None = None) -> Trainer:
        t = Trainer(tiny_config(**{**common, "run.name": name}), progress=False)
        t.setup()
        t.fit(stop_after=stop_after)
        return t

    straight = run("straight")
    run("resumed", stop_after=2)
    resumed = run("resumed")
    assert resumed.resumed_from == 2
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert any(k.endswith("sinks") for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in straight.metrics.read()] == [r["loss"] for r in resumed.metrics.read()]
