"""Bring your own model: tiny random Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE, DeepSeek-V3, DeepSeek-V2 and GLM-4.5 MoE
models built with transformers from their config classes (no downloads; every bias and correction bias non-zero,
YaRN on for the last three), saved sharded, load into our model with logits within 1e-5 (fp32) and token-identical
greedy generation through the serving engine; exporting gives the same architecture and the same tensors back."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from moe_platform.checkpoint.hf import export_hf, load_hf, supported_architectures
from moe_platform.model.transformer import MoETransformer
from moe_platform.serving.engine import Engine, SamplingParams
from tinyrun import HF_ARCHITECTURES, hf_config, save_tiny_hf_model, tiny_tokenizer

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module", params=HF_ARCHITECTURES)
def hf_model(request, tokenizer_dir, tmp_path_factory):
    """(architecture, transformers model, its directory), saved in shards with a model.safetensors.index.json."""
    model, out = save_tiny_hf_model(request.param, tmp_path_factory.mktemp(request.param), tokenizer_dir)
    return request.param, model, out


def ours(model_dir) -> MoETransformer:
    args, state = load_hf(model_dir)
    model = MoETransformer(args)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_saved_sharded(hf_model):
    _, _, out = hf_model
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1


@pytest.mark.parametrize("shape", [(1, 1), (2, 19), (3, 64)])
def test_logits_match_transformers(hf_model, shape):
    arch, hf, out = hf_model
    model = ours(out)
    assert model.args.hf_architecture == arch
    tokens = torch.randint(0, model.args.vocab_size, shape, generator=torch.Generator().manual_seed(shape[1]))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits.float(), rtol=1e-5, atol=1e-5)


def test_greedy_generation_through_the_engine_is_token_identical(hf_model):
    _, hf, out = hf_model
    engine = Engine.from_pretrained(out, batch_wait_timeout_s=0.0)
    prompts = [[5, 17, 42, 7, 99], [3] * 11, list(range(20, 60))]
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    got: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id].extend(o.token_ids)
    for prompt, rid in zip(prompts, ids, strict=True):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens, min_new_tokens=GREEDY.max_tokens,
                           do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert got[rid] == want


def test_export_is_the_same_architecture_bit_for_bit(hf_model, tmp_path):
    arch, hf, out = hf_model
    args, state = load_hf(out)
    export_hf(state, args, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == [arch]
    theirs = {}
    for shard in out.glob("*.safetensors"):
        theirs.update(load_file(shard))
    again = load_file(tmp_path / "export" / "model.safetensors")
    assert again.keys() == theirs.keys()
    assert all(torch.equal(again[k], theirs[k]) for k in theirs)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    assert type(reloaded).__name__ == arch
    tokens = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)


def test_an_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"cannot import architecture \['LlamaForCausalLM'\]: supported are") as e:
        load_hf(tmp_path)
    assert all(name in str(e.value) for name in supported_architectures())
    assert "trust_remote_code" in str(e.value)


@pytest.mark.parametrize("arch, change, match", [
    ("Qwen3MoeForCausalLM", {"use_sliding_window": True}, "use_sliding_window"),
    ("Qwen3MoeForCausalLM", {"attention_bias": True}, "attention_bias"),
    ("Qwen3MoeForCausalLM", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
     r"rope type 'dynamic' is not supported: supported are default, linear, yarn"),
    ("MixtralForCausalLM", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "'longrope'"),
    ("MixtralForCausalLM", {"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
    ("DeepseekV3ForCausalLM", {"topk_method": "greedy"}, "topk_method = 'greedy'"),
    ("DeepseekV3ForCausalLM", {"scoring_func": "softmax"}, "scoring_func = 'softmax'"),
    ("DeepseekV3ForCausalLM", {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},
     "quantization_config"),
    ("DeepseekV3ForCausalLM", {"moe_layer_freq": 2}, "moe_layer_freq = 2"),
    ("DeepseekV2ForCausalLM", {"topk_method": "noaux_tc"},
     "topk_method = 'noaux_tc' is not supported: supported are greedy, group_limited_greedy"),
    ("DeepseekV2ForCausalLM", {"norm_topk_prob": True}, "norm_topk_prob = True is not supported"),
    ("DeepseekV2ForCausalLM", {"mlp_bias": True}, "mlp_bias = True"),
    ("Glm4MoeForCausalLM", {"sliding_window": 64}, "sliding_window = 64"),
    ("Glm4MoeForCausalLM", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
     "rope type 'llama3'"),
])
def test_settings_we_do_not_compute_are_refused(tmp_path, arch, change, match):
    config = hf_config(arch, 300).to_dict() | change
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        load_hf(tmp_path)


def _logits_match(hf, out, shape=(2, 100)):
    model = ours(out)
    tokens = torch.randint(0, model.args.vocab_size, shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits.float(), rtol=1e-5, atol=1e-5)
    return model


@pytest.mark.parametrize("arch, change", [
    ("Qwen3MoeForCausalLM", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                                 "original_max_position_embeddings": 32}}),
    ("Qwen2MoeForCausalLM", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}),
    ("MixtralForCausalLM", {"head_dim": 16, "rope_parameters": {  # transformers' yarn needs Mixtral's head_dim set
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 64,
        "attention_factor": 1.3}}),
    ("Qwen3MoeForCausalLM", {"mlp_only_layers": [1], "num_hidden_layers": 3, "layer_types": None}),
    ("Qwen2MoeForCausalLM", {"decoder_sparse_step": 2, "num_hidden_layers": 3, "layer_types": None}),
])
def test_scaled_rope_and_dense_layers_of_qwen_and_mixtral(tokenizer_dir, tmp_path, arch, change):
    """Configs that set rope_scaling (YaRN, linear) and Qwen's dense layers (mlp_only_layers, decoder_sparse_step)
    import with transformers' logits and export as they came."""
    import tinyrun

    base = tinyrun.hf_config
    tinyrun.hf_config = lambda a, v: type(base(a, v))(**(base(a, v).to_dict() | change))
    try:
        hf, out = save_tiny_hf_model(arch, tmp_path / "model", tokenizer_dir)
    finally:
        tinyrun.hf_config = base
    model = _logits_match(hf, out)
    assert model.args.rope_type != "default" or model.args.dense_layers
    export_hf(model.state_dict(), model.args, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    tokens = torch.randint(0, model.args.vocab_size, (1, 90), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, hf(tokens).logits, rtol=1e-5, atol=1e-5)


def test_multi_token_prediction_layer_is_skipped_and_logged(tokenizer_dir, tmp_path, caplog):
    """DeepSeek-V3 checkpoints carry a multi-token-prediction module as layer num_hidden_layers, which the causal LM
    does not use: its tensors are not read, and the log says so."""
    from safetensors.torch import save_file

    hf, out = save_tiny_hf_model("DeepseekV3ForCausalLM", tmp_path / "model", tokenizer_dir)
    mtp = {f"model.layers.2.{n}": torch.ones(4, 64) for n in ("eh_proj.weight", "enorm.weight", "hnorm.weight",
                                                              "self_attn.kv_b_proj.weight")}
    save_file(mtp, str(out / "mtp.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(mtp, "mtp.safetensors"))
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with caplog.at_level("INFO", logger="moe_platform.checkpoint.hf"):
        _logits_match(hf, out)
    assert "skipped layers [2] beyond num_hidden_layers = 2" in caplog.text


def test_training_starts_from_the_imported_model(hf_model, tiny_config):
    """init.from_hf: the model's own tokenizer (none is trained), its weights as step 0 (the first step's loss is
    transformers' loss on the same batch), and an export in the same architecture."""
    from moe_platform.train.backends import lm_loss
    from moe_platform.train.trainer import Trainer

    arch, hf, out = hf_model
    cfg = tiny_config(**{"init.from_hf": str(out), "train.steps": 2, "checkpoint.interval": 0,
                         "run.name": f"ft-{arch}"})
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    assert (trainer.tokenizer_dir / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    assert trainer.model_args.hf_architecture == arch
    position = trainer.sampler.state_dict()
    batch = trainer._micro_batches(trainer.sampler.next_global_batch())
    trainer.sampler.load_state_dict(position)
    with torch.no_grad():
        want = sum(float(lm_loss(hf(tokens).logits, targets)) for tokens, targets in batch) / len(batch)
    first = trainer.train_step()
    assert abs(first["loss"] - want) <= 1e-5 * want, (first["loss"], want)
    result = trainer.fit()
    config = json.loads((result.export_dir / "config.json").read_text())
    assert config["architectures"] == [arch]
    assert (result.export_dir / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("degrees", [dict(tp=2), dict(dp=2, ep=2), dict(dp=2, tp=2, ep=2)])
def test_each_rank_reads_only_its_share_of_the_sharded_directory(hf_model, degrees):
    """HFWeights reads a rank's boxes of each tensor (expert ranges, tensor-parallel rows and columns, the gate and up
    halves of the fused expert projection) straight from the safetensors shards: the same values as slicing the
    whole model, and exactly their bytes, never the whole model."""
    from moe_platform.checkpoint.hf import HFWeights
    from moe_platform.parallel.layout import Layout, ProcessGroups
    from moe_platform.parallel.placement import full_shapes, local_shard_spec

    _, _, out = hf_model
    args, full = load_hf(out)
    layout = Layout(**degrees)
    total = HFWeights(out).total_bytes
    assert total == sum(t.nbytes for n, t in full.items() if not (n == "lm_head.weight" and args.tie_word_embeddings))
    for rank in range(layout.world_size):
        groups = ProcessGroups(layout, rank)
        weights = HFWeights(out)
        want = 0
        for name, shape in full_shapes(args).items():
            spec = local_shard_spec(name, shape, groups)
            expected = spec.extract(full[name])
            assert torch.equal(weights.read(name, spec), expected), f"rank {rank}: {name}"
            want += expected.nbytes
        weights.close()
        assert weights.bytes_read == want < total, (rank, weights.bytes_read, want, total)
