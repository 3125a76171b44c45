"""Single-device model: shapes, causality, KV-cache decoding equals the full forward, option matrix."""

from __future__ import annotations

import pytest
import torch

from moe_platform.model.args import ModelArgs
from moe_platform.model.kv_cache import KVCache
from moe_platform.model.transformer import build_model

BASE = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=40, num_experts=4, top_k=2,
            max_seq_len=48)
OPTIONS = {
    "mixtral": {},
    "mha": {"n_kv_heads": 4},
    "shared_experts": {"n_shared_experts": 1, "shared_intermediate_size": 24},
    "bias_balancing": {"balancing": "bias"},
    "capacity": {"capacity_factor": 1.0},
    "top1": {"top_k": 1},
    "fine_grained": {"num_experts": 8, "top_k": 4, "intermediate_size": 16},
    "tied": {"tie_word_embeddings": True},
    "z_loss": {"z_loss_coef": 1e-3},
    "deepseek": {"kv_lora_rank": 16, "q_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
                 "v_head_dim": 6, "rope_interleave": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
                 "n_group": 2, "balancing": "bias", "routed_scaling_factor": 2.5, "dense_layers": "0",
                 "n_shared_experts": 1, "rope_type": "yarn", "rope_factor": 4.0, "rope_original_max_seq_len": 16,
                 "rope_mscale_all_dim": 1.0},
    "gpt_oss": {"attention_bias": True, "o_proj_bias": True, "attention_sinks": True, "router_bias": True,
                "expert_bias": True, "expert_activation": "clamped_swiglu", "sliding_window": 8,
                "sliding_layers": "0"},
}


def make(opt: str) -> torch.nn.Module:
    return build_model(ModelArgs(**{**BASE, **OPTIONS[opt]}), seed=0).eval()


@pytest.mark.parametrize("opt", OPTIONS)
def test_forward_shapes_and_finite(opt):
    model = make(opt)
    tokens = torch.randint(0, 97, (3, 11))
    logits = model(tokens)
    assert logits.shape == (3, 11, 97) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("opt", ["mixtral", "shared_experts", "bias_balancing"])
def test_causal_masking(opt):
    model = make(opt)
    tokens = torch.randint(0, 97, (2, 12))
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    # Not bitwise: experts see different row counts, so matmul blocking (and rounding) may differ.
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("opt", ["mixtral", "mha", "shared_experts", "fine_grained"])
def test_kv_cache_decode_equals_full_forward(opt):
    model = make(opt)
    tokens = torch.randint(0, 97, (2, 14))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.args, num_slots=5, max_len=32)
        slots = torch.tensor([4, 1])
        pos = torch.arange(6).expand(2, 6)
        steps = [model(tokens[:, :6], pos, cache.bind(slots, pos))]
        for t in range(6, 14):
            p = torch.full((2, 1), t)
            steps.append(model(tokens[:, t:t + 1], p, cache.bind(slots, p)))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_rows_at_different_positions():
    """Continuous batching: one row decodes at position 9 while another starts; each equals its own full forward."""
    model = make("mixtral")
    a, b = torch.randint(0, 97, (1, 10)), torch.randint(0, 97, (1, 4))
    with torch.no_grad():
        ref_a, ref_b = model(a)[0, -1], model(b)[0, -1]
        cache = KVCache(model.args, num_slots=2, max_len=16)
        pos = torch.arange(9)[None]
        model(a[:, :9], pos, cache.bind(torch.tensor([0]), pos))
        # Row 0 decodes token 9; row 1 prefills 4 tokens, right-padded to width 4 for row 0's single token.
        tokens = torch.stack([torch.cat([a[0, 9:10], a[0, 9:10].repeat(3)]), b[0]])
        positions = torch.tensor([[9, 10, 11, 12], [0, 1, 2, 3]])
        out = model(tokens, positions, cache.bind(torch.tensor([0, 1]), positions))
    torch.testing.assert_close(out[0, 0], ref_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, 3], ref_b, rtol=1e-5, atol=1e-5)


def test_kv_cache_rejects_overflow():
    model = make("mixtral")
    cache = KVCache(model.args, num_slots=1, max_len=8)
    pos = torch.arange(9)[None]
    with pytest.raises(ValueError, match="beyond the KV cache length 8"):
        cache.bind(torch.tensor([0]), pos)


def test_training_backward_reaches_every_parameter():
    model = build_model(ModelArgs(**{**BASE, "n_shared_experts": 1}), seed=0).train()
    tokens = torch.randint(0, 97, (4, 16))
    model(tokens).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert float(model.moe_layers()[0].last_aux_loss) > 0


def test_seeded_build_is_deterministic_and_leaves_global_rng_alone():
    args = ModelArgs(**BASE)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a, b = build_model(args, seed=3), build_model(args, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("bad, match", [
    ({"n_heads": 8, "n_kv_heads": 3}, "divisible by model.n_kv_heads"),
    ({"top_k": 9}, "must be <= model.num_experts"),
    ({"balancing": "x"}, "balancing must be one of"),
    ({"capacity_factor": -1.0}, "capacity_factor must be >= 0"),
])
def test_bad_model_args(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelArgs(**{**BASE, **bad})


MLA = {"kv_lora_rank": 16, "q_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6}
OSS = {"attention_bias": True, "o_proj_bias": True, "attention_sinks": True, "router_bias": True, "expert_bias": True,
       "expert_activation": "clamped_swiglu", "sliding_window": 4, "sliding_layers": "0"}


@pytest.mark.parametrize("opt", [{"n_shared_experts": 1}, {**MLA, "attention_bias": True, "dense_layers": "0",
                                                           "dense_intermediate_size": 40},
                                 {**MLA, "q_lora_rank": 0}, OSS])
def test_param_count_matches_module(opt):
    args = ModelArgs(**{**BASE, **opt})
    model = build_model(args)
    assert args.num_params()["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("bad, match", [
    ({**MLA, "v_head_dim": 0}, "needs model.v_head_dim > 0"),
    ({"q_lora_rank": 8}, "q_lora_rank needs multi-head latent attention"),
    ({**MLA, "sliding_layers": "0", "sliding_window": 4}, "not of multi-head latent attention"),
    ({"topk_method": "noaux_tc", "n_group": 3}, r"n_group \(3\) must be >= 1 and divide model.num_experts"),
    ({"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 5}, "topk_group"),
    ({"scoring_func": "tanh"}, "scoring_func must be one of"),
    ({"rope_type": "dynamic"}, "rope_type must be one of"),
    ({"rope_type": "yarn", "rope_factor": 4.0}, "needs model.rope_original_max_seq_len"),
    ({"partial_rotary_factor": 0.0}, r"partial_rotary_factor must be in \(0, 1\]"),
    ({"sliding_layers": "1"}, "needs model.sliding_window > 0"),
    ({"expert_activation": "gelu"}, "expert_activation must be one of"),
])
def test_bad_deepseek_and_gpt_oss_options(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelArgs(**{**BASE, **bad})


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("opt", [{}, {"n_shared_experts": 1, "shared_expert_gate": True, "qk_norm": "head"},
                                 {**MLA, "dense_layers": "0"}, {**OSS, "sliding_window": 6}])
def test_activation_checkpointing_is_bitwise_the_same_step(mode, opt):
    """Recomputing layers (full) or attention and experts (selective) in backward gives the losses, gradients and
    routing statistics of keeping every activation, bit for bit, and saves fewer tensors for backward."""
    args = ModelArgs(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48,
                     num_experts=4, top_k=2, max_seq_len=32, z_loss_coef=1e-3, **opt)
    tokens = torch.randint(0, 96, (3, 24), generator=torch.Generator().manual_seed(0))
    segments = torch.tensor([[0] * 10 + [1] * 14, [0] * 24, [0] * 5 + [1] * 5 + [2] * 14])

    def step(checkpointing: str):
        model = build_model(args, seed=0).train()
        model.set_activation_checkpointing(checkpointing)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = torch.nn.functional.cross_entropy(model(tokens, segments=segments).flatten(0, 1),
                                                     tokens.roll(-1, 1).flatten())
        loss.backward()
        moes = model.moe_layers()
        return (loss.detach(), {n: p.grad for n, p in model.named_parameters()},
                [(m.step_load.clone(), m.step_aux.clone()) for m in moes], sum(saved))

    ref_loss, ref_grads, ref_stats, ref_saved = step("none")
    loss, grads, stats, saved = step(mode)
    assert torch.equal(loss, ref_loss)
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), f"{mode}: gradient of {name} differs"
    for (load, aux), (ref_load, ref_aux) in zip(stats, ref_stats, strict=True):
        assert torch.equal(load, ref_load) and torch.equal(aux, ref_aux), "recomputation counted tokens twice"
    assert saved < ref_saved, f"{mode} kept {saved} saved elements, none kept {ref_saved}"


def test_unknown_activation_checkpointing_is_refused():
    model = build_model(ModelArgs(vocab_size=96, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=48,
                                  num_experts=4, top_k=2, max_seq_len=32))
    with pytest.raises(ValueError, match="activation checkpointing must be one of none, full, selective"):
        model.set_activation_checkpointing("some")
