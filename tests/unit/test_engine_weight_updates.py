"""New weights in a running engine (no Ray), as GRPO's weight sync uses it: `update_weights` swaps a model's tensors in
between steps (used in place, without a copy, when they have the engine's dtype) and `put_adapter` writes an adapter
held in memory over the one loaded under its name. Either way the engine then generates exactly what an engine built
on the new weights generates, cached prompt prefixes included (the prefix cache is dropped); names, shapes and
quantized engines are refused."""

from __future__ import annotations

import pytest
import torch

from moe_platform.checkpoint.adapters import read_adapters
from moe_platform.checkpoint.hf import export_hf
from moe_platform.model.args import ModelArgs
from moe_platform.model.transformer import build_model
from moe_platform.serving.engine import Engine
from moe_platform.tokenizer import load_tokenizer
from tinyrun import engine_outputs, random_adapter, tiny_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    args = ModelArgs(vocab_size=load_tokenizer(tok).get_vocab_size(), dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                     intermediate_size=64, num_experts=4, top_k=2, n_shared_experts=1, max_seq_len=128, init_std=0.1)
    states = [build_model(args, seed=s).state_dict() for s in (0, 1)]
    exports = [export_hf(st, args, tmp_path_factory.mktemp(f"m{i}"), tokenizer_dir=tok) for i, st in enumerate(states)]
    adapters = [random_adapter(args, states[0], ("q_proj", "v_proj", "experts"), 4, seed,
                               tmp_path_factory.mktemp(f"a{seed}"), None)[0] for seed in (1, 2)]
    return {"args": args, "states": states, "exports": exports, "adapters": adapters}


PROMPTS = ["ROMEO: " * 12 + "what light", "ROMEO: " * 12 + "through yonder window breaks", "KING " * 9]


def test_new_weights_generate_what_an_engine_built_on_them_does(setup):
    engine = Engine.from_pretrained(setup["exports"][0])
    fresh = Engine.from_pretrained(setup["exports"][1])
    before = engine_outputs(engine, PROMPTS)
    again = engine_outputs(engine, PROMPTS)  # from cached prefix blocks: KV of the old weights
    assert [t for t, _ in again] == [t for t, _ in before] and engine.stats()["prefix_cache_hits"] > 0
    new = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    moved = engine.update_weights(new)
    assert moved == sum(t.numel() * t.element_size() for t in new.values())
    assert engine.model.model.embed_tokens.weight.data_ptr() == new["model.embed_tokens.weight"].data_ptr()  # no copy
    after = engine_outputs(engine, PROMPTS)
    assert after == engine_outputs(fresh, PROMPTS) and after != before  # tokens and log-probabilities, exactly


def test_bad_new_weights_are_refused(setup):
    engine = Engine.from_pretrained(setup["exports"][0])
    state = engine.model.state_dict()
    with pytest.raises(ValueError, match=r"has no tensors \['model.nope'\]"):
        engine.update_weights({"model.nope": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"\['model.embed_tokens.weight'\] have other shapes"):
        engine.update_weights({"model.embed_tokens.weight": state["model.embed_tokens.weight"][:3]})
    quantized = Engine.from_pretrained(setup["exports"][0], quantization="int8")
    with pytest.raises(ValueError, match=r"this engine serves int8 weights"):
        quantized.update_weights({"model.norm.weight": state["model.norm.weight"]})


def test_an_adapter_put_over_a_loaded_one_serves_as_if_loaded_from_its_files(setup):
    a_dir, b_dir = setup["adapters"]
    engine = Engine.from_pretrained(setup["exports"][0], max_loras=1, max_lora_rank=4)
    engine.put_adapter("policy", read_adapters(a_dir))
    assert engine.loaded_adapters()[0]["source"] == "memory"
    first = engine_outputs_with(engine, "policy")
    engine.put_adapter("policy", read_adapters(b_dir), "step-1")  # the same slot, new weights
    second = engine_outputs_with(engine, "policy")
    for directory, got in ((a_dir, first), (b_dir, second)):
        reference = Engine.from_pretrained(setup["exports"][0], max_loras=1, max_lora_rank=4)
        reference.load_adapter("x", str(directory))
        assert got == engine_outputs_with(reference, "x")
    assert first != second and [a["source"] for a in engine.loaded_adapters()] == ["step-1"]


def engine_outputs_with(engine: Engine, adapter: str) -> list[tuple[list[int], list[float]]]:
    from moe_platform.serving.engine import SamplingParams

    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=0)
    ids = [engine.add_request(p, params, adapter=adapter) for p in PROMPTS]
    got = {i: ([], []) for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id][0].extend(out.token_ids)
            got[out.request_id][1].extend(lp for lp, _ in out.logprobs or [])
    return [got[i] for i in ids]
