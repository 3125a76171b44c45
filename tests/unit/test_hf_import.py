"""Bring your own model: tiny random Mixtral, Qwen3-MoE, Qwen2-MoE and OLMoE models built with transformers from their
config classes (no downloads), saved sharded, load into our model with logits within 1e-5 (fp32) and token-identical
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
from moe_platform.tokenizer import save_tokenizer, train_tokenizer
from tinyrun import corpus_text

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, num_experts_per_tok=2, tie_word_embeddings=False)
CONFIGS = {
    "MixtralForCausalLM": lambda v: transformers.MixtralConfig(vocab_size=v, intermediate_size=48, num_local_experts=8,
                                                               **COMMON),
    "Qwen3MoeForCausalLM": lambda v: transformers.Qwen3MoeConfig(vocab_size=v, intermediate_size=96,
                                                                 moe_intermediate_size=32, num_experts=8,
                                                                 norm_topk_prob=True, head_dim=24, **COMMON),
    "Qwen2MoeForCausalLM": lambda v: transformers.Qwen2MoeConfig(vocab_size=v, intermediate_size=96,
                                                                 moe_intermediate_size=32, num_experts=8,
                                                                 shared_expert_intermediate_size=40, **COMMON),
    "OlmoeForCausalLM": lambda v: transformers.OlmoeConfig(vocab_size=v, intermediate_size=32, num_experts=8,
                                                           **COMMON),
}
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    text = corpus_text(60_000)
    tok = train_tokenizer([text[i:i + 2000] for i in range(0, len(text), 2000)], 300)
    return save_tokenizer(tok, tmp_path_factory.mktemp("tok"), model_max_length=128)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_model(request, tokenizer_dir, tmp_path_factory):
    """(architecture, transformers model, its directory): random weights everywhere (norms and routers included,
    so a misplaced tensor shows), saved in shards of ~100 KB with a model.safetensors.index.json."""
    from moe_platform.tokenizer import load_tokenizer

    vocab = load_tokenizer(tokenizer_dir).get_vocab_size()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param](vocab), dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp(request.param)
    model.eval().save_pretrained(out, max_shard_size="100KB")
    for f in tokenizer_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
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


@pytest.mark.parametrize("change, match", [
    ({"mlp_only_layers": [0]}, "mlp_only_layers"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_settings_we_do_not_compute_are_refused(tmp_path, change, match):
    config = CONFIGS["Qwen3MoeForCausalLM"](300).to_dict() | change
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        load_hf(tmp_path)
