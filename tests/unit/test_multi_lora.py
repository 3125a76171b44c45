"""Multi-LoRA serving in the engine (no Ray): one engine holds several adapters and mixes them with the base model
in one batch, each request's greedy tokens equal to its adapter merged into the model (expert adapters) and to
transformers + peft (attention adapters saved by peft itself); adapters load and unload between steps without
touching requests in flight; adapters of another base model, bad files and too large ranks are refused by name."""

from __future__ import annotations

import pytest
import torch

from moe_platform.checkpoint.hf import export_hf
from moe_platform.model.args import ModelArgs
from moe_platform.model.transformer import build_model
from moe_platform.serving.adapters import AdapterLoadError
from moe_platform.serving.engine import Engine, SamplingParams
from moe_platform.serving.errors import NotFoundError
from moe_platform.serving.multi_lora import Segments, lora_delta
from tinyrun import random_adapter, tiny_tokenizer

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "experts", "shared_experts")


def model_args(vocab: int, shared: int = 1, dim: int = 64) -> ModelArgs:
    return ModelArgs(vocab_size=vocab, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
                     num_experts=4, top_k=2, n_shared_experts=shared, max_seq_len=128, init_std=0.1)


def make_adapter(args: ModelArgs, base_seed: int, targets: tuple[str, ...], rank: int, seed: int, out, tok):
    """A random adapter on the base model built with `base_seed`: (its directory, the merged model's export)."""
    return random_adapter(args, build_model(args, seed=base_seed).state_dict(), targets, rank, seed, out, tok)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    from moe_platform.tokenizer import load_tokenizer

    args = model_args(load_tokenizer(tok).get_vocab_size())
    base = export_hf(build_model(args, seed=0).state_dict(), args, tmp_path_factory.mktemp("base"), tokenizer_dir=tok)
    a = make_adapter(args, 0, ALL, 4, 1, tmp_path_factory.mktemp("a"), tok)
    b = make_adapter(args, 0, ("q_proj", "v_proj"), 8, 2, tmp_path_factory.mktemp("b"), tok)
    return {"tok": tok, "args": args, "base": base, "a": a, "b": b}


@pytest.fixture(scope="module")
def prompts(setup):
    engine = Engine.from_pretrained(setup["base"])
    return [engine.encode(t) for t in ("ROMEO:", "JULIET:\nO Romeo, Romeo!", "First Citizen:\nBefore we", "KING " * 9)]


def greedy(engine: Engine, prompts, adapters=None) -> list[list[int]]:
    """Each prompt's generated token ids, all submitted together (one batch)."""
    out: dict[str, list[int]] = {}
    ids = [engine.add_request(p, GREEDY, adapter=a) for p, a in zip(prompts, adapters or [None] * len(prompts),
                                                                     strict=True)]
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
    return [out[i] for i in ids]


def test_a_mixed_batch_gives_each_request_its_adapters_output(setup, prompts):
    engine = Engine.from_pretrained(setup["base"], max_loras=2, max_lora_rank=8, batch_wait_timeout_s=0.0)
    engine.load_adapter("a", str(setup["a"][0]))
    engine.load_adapter("b", str(setup["b"][0]))
    which = [None, "a", "b", "a"]
    mixed = greedy(engine, prompts, which)
    assert engine.stats()["decode_forwards"] == GREEDY.max_tokens - 1, "all four decoded together"
    refs = {None: Engine.from_pretrained(setup["base"]), "a": Engine.from_pretrained(setup["a"][1]),
            "b": Engine.from_pretrained(setup["b"][1])}
    for p, adapter, got in zip(prompts, which, mixed, strict=True):
        assert got == greedy(refs[adapter], [p])[0], f"adapter {adapter}"
    assert mixed[1] != greedy(refs[None], [prompts[1]])[0], "the adapter changed nothing"
    names = [a["name"] for a in engine.loaded_adapters()]
    assert names == ["a", "b"]


def test_grouped_adapter_math_equals_each_rows_own_adapter():
    g = torch.Generator().manual_seed(0)
    a, b, scale = torch.randn(4, 4, 16, generator=g), torch.randn(4, 8, 4, generator=g), torch.tensor([0.5, 2, 1, 3])
    x, groups = torch.randn(10, 16, generator=g), torch.tensor([0, -1, 2, 2, 1, 0, -1, 1, 2, 0])  # group 3: no rows
    expected = torch.stack([torch.zeros(8) if k < 0 else scale[k] * b[k] @ (a[k] @ x[i])
                            for i, k in enumerate(groups.tolist())])
    a_t, b_t = a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous()
    torch.testing.assert_close(lora_delta(x, a_t, b_t, scale, Segments(groups, 4)), expected)


def test_adapters_load_and_unload_between_steps_without_failing_requests(setup, prompts):
    engine = Engine.from_pretrained(setup["base"], max_loras=2, max_lora_rank=8, batch_wait_timeout_s=0.0)
    engine.load_adapter("a", str(setup["a"][0]))
    engine.load_adapter("b", str(setup["b"][0]))
    assert engine.load_adapter("a", str(setup["a"][0])).slot == 0, "the same adapter again is a no-op"
    tokens: list[int] = []
    engine.add_request(prompts[0], GREEDY, sink=lambda out: tokens.extend(out.token_ids), adapter="a")
    engine.step()
    engine.unload_adapter("a")  # in flight: the request goes on, new ones are refused, the slot stays taken
    with pytest.raises(NotFoundError, match="no adapter named 'a'"):
        engine.add_request(prompts[1], GREEDY, adapter="a")
    with pytest.raises(AdapterLoadError, match="all 2 adapter slots are in use"):
        engine.load_adapter("c", str(setup["a"][0]))
    while engine.has_unfinished():
        engine.step()
    assert tokens == greedy(Engine.from_pretrained(setup["a"][1]), [prompts[0]])[0]
    assert [a["name"] for a in engine.loaded_adapters()] == ["b"]
    assert engine.load_adapter("c", str(setup["a"][0])).slot == 0, "the freed slot"
    assert greedy(engine, [prompts[2]], ["c"]) == greedy(Engine.from_pretrained(setup["a"][1]), [prompts[2]])


def test_adapters_of_another_base_and_bad_files_are_refused(setup, tmp_path):
    engine = Engine.from_pretrained(setup["base"], max_loras=1, max_lora_rank=4)
    other_weights, _ = make_adapter(setup["args"], 7, ("q_proj",), 4, 3, tmp_path / "w", setup["tok"])
    with pytest.raises(AdapterLoadError, match="trained on a different base model"):
        engine.load_adapter("x", str(other_weights))
    other_shape, _ = make_adapter(model_args(setup["args"].vocab_size, dim=32), 0, ("q_proj",), 4, 3, tmp_path / "s",
                                  setup["tok"])
    (other_shape / "adapter_model.safetensors").write_bytes(
        (other_shape / "adapter_model.safetensors").read_bytes().replace(b"base_fingerprint", b"other_metadata__"))
    with pytest.raises(AdapterLoadError, match=r"self_attn.lora.q_proj.A has shape \(4, 32\).*\(4, 64\)"):
        engine.load_adapter("x", str(other_shape))
    with pytest.raises(AdapterLoadError, match="rank 8, above this server's max_lora_rank 4"):
        engine.load_adapter("x", str(setup["b"][0]))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(AdapterLoadError, match="adapter_model.safetensors is not a readable safetensors file"):
        engine.load_adapter("x", str(broken))
    with pytest.raises(AdapterLoadError, match="no adapter_config.json"):
        engine.load_adapter("x", str(tmp_path))
    with pytest.raises(AdapterLoadError, match="set the engine option max_loras"):
        Engine.from_pretrained(setup["base"]).load_adapter("a", str(setup["a"][0]))
    assert engine.loaded_adapters() == []


def test_a_peft_adapter_serves_what_transformers_and_peft_generate(setup, tmp_path):
    import transformers
    from peft import LoraConfig, get_peft_model

    args = model_args(setup["args"].vocab_size, shared=0)  # Mixtral's layout: transformers loads the export
    base = export_hf(build_model(args, seed=0).state_dict(), args, tmp_path / "base", tokenizer_dir=setup["tok"])
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)  # random B as well: the adapter changes the output
    peft_model = get_peft_model(hf, config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    engine = Engine.from_pretrained(base, max_loras=1, max_lora_rank=4)
    engine.load_adapter("p", str(tmp_path / "peft"))
    prompt = engine.encode("JULIET:\nO Romeo")
    with torch.no_grad():
        theirs = peft_model.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens, do_sample=False,
                                     min_new_tokens=GREEDY.max_tokens, eos_token_id=None, pad_token_id=0)
    theirs = theirs[0, len(prompt):].tolist()
    ours = greedy(engine, [prompt, prompt], ["p", None])
    assert ours[0] == theirs
    assert ours[1] != theirs, "the adapter changed nothing"
