"""Exports load in transformers as Mixtral: logits agree within 1e-5 (fp32) and greedy generation is identical."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from moe_platform.checkpoint.hf import ARCHITECTURES, export_hf, hf_config, load_hf
from moe_platform.model.args import ModelArgs
from moe_platform.model.kv_cache import KVCache
from moe_platform.model.transformer import build_model

ARGS = ModelArgs(vocab_size=211, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=80, num_experts=8,
                 top_k=2, max_seq_len=96)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = build_model(ARGS, seed=1).eval()
    out = export_hf(model.state_dict(), ARGS, tmp_path_factory.mktemp("export"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    return model, hf, out


def test_export_is_mixtral(exported):
    _, hf, out = exported
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    assert type(hf).__name__ == "MixtralForCausalLM"


@pytest.mark.parametrize("shape", [(1, 1), (2, 17), (3, 64)])
def test_logits_match_transformers(exported, shape):
    model, hf, _ = exported
    tokens = torch.randint(0, ARGS.vocab_size, shape, generator=torch.Generator().manual_seed(shape[1]))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-5)


def greedy(model, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    cache = KVCache(model.args, num_slots=1, max_len=prompt.shape[1] + new_tokens)
    slot = torch.tensor([0])
    pos = torch.arange(prompt.shape[1])[None]
    with torch.no_grad():
        logits = model(prompt, pos, cache.bind(slot, pos))
        out = []
        for i in range(new_tokens):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            p = torch.tensor([[prompt.shape[1] + i]])
            logits = model(torch.tensor([[nxt]]), p, cache.bind(slot, p))
    return out


def test_greedy_generation_is_token_identical(exported):
    model, hf, _ = exported
    prompt = torch.randint(1, ARGS.vocab_size, (1, 9), generator=torch.Generator().manual_seed(7))
    ours = greedy(model, prompt, 30)
    theirs = hf.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0,
                         attention_mask=torch.ones_like(prompt))[0, 9:].tolist()
    assert ours == theirs


def test_round_trip_and_import_of_hf_directory(exported, tmp_path):
    model, hf, out = exported
    args, state = load_hf(out)
    assert args == ARGS
    again = build_model(args)
    again.load_state_dict(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    # A Mixtral directory written by transformers itself (no moe-platform args file) imports too.
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    args2, state2 = load_hf(tmp_path / "hf")
    imported = build_model(args2)
    imported.load_state_dict(state2)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(imported.eval()(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_non_mixtral_options_export_our_format(tmp_path):
    args = ModelArgs(**{**ARGS.to_dict(), "n_shared_experts": 1, "balancing": "bias"})
    model = build_model(args, seed=2).eval()
    out = export_hf(model.state_dict(), args, tmp_path)
    assert json.loads((out / "config.json").read_text())["model_type"] == "moe-platform"
    args2, state = load_hf(out)
    again = build_model(args2)
    again.load_state_dict(state)
    tokens = torch.randint(0, args.vocab_size, (1, 10))
    with torch.no_grad():
        assert torch.equal(again.eval()(tokens), model(tokens))


def test_missing_or_pickled_weights_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(ValueError, match=r"MixtralForCausalLM config.json lacks \['vocab_size', 'hidden_size'"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(ARGS, ARCHITECTURES["MixtralForCausalLM"])))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights \(pickled \.bin weights are not loaded\)"):
        load_hf(tmp_path)
