"""MoE layer against single-process references: a naive per-expert loop, transformers' Mixtral block and loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_platform.model.args import ModelArgs
from moe_platform.model.moe import MoE, update_routing_biases


def build_moe(seed: int = 0, std: float = 0.2, **overrides) -> MoE:
    cfg = dict(dim=16, intermediate_size=24, num_experts=8, top_k=2, n_heads=1, n_kv_heads=1, balancing="none")
    moe = MoE(ModelArgs(**{**cfg, **overrides}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return moe


def randn(*shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def naive_moe(moe: MoE, x: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """Mixtral's loop: per expert, index its tokens, SwiGLU, weight by the router, index_add back.

    With `capacity`, an expert keeps only its first `capacity` assignments in (token, slot) order.
    """
    probs = torch.softmax(F.linear(x, moe.gate.weight).float(), dim=-1)
    weights, indices = torch.topk(probs, moe.top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    gate_up, down = moe.experts.gate_up_proj, moe.experts.down_proj
    out = torch.zeros_like(x)
    for e in range(moe.num_experts):
        token, slot = torch.where(indices == e)  # row-major: (token, slot) order
        if capacity is not None:
            token, slot = token[:capacity], slot[:capacity]
        if token.numel() == 0:
            continue
        gate, up = (x[token] @ gate_up[e].t()).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ down[e].t()
        out.index_add_(0, token, y * weights[token, slot, None])
    return out


def grads_of(moe: MoE, x: torch.Tensor, fn, grad_out: torch.Tensor) -> list[torch.Tensor]:
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    out.backward(grad_out)
    return [out.detach(), x.grad, moe.gate.weight.grad, moe.experts.gate_up_proj.grad, moe.experts.down_proj.grad]


SHAPES = [  # tokens, dim, intermediate, experts, top_k
    pytest.param(64, 16, 24, 8, 2, id="even"),
    pytest.param(5, 16, 24, 16, 2, id="idle-experts"),  # 10 assignments over 16 experts: most get zero tokens
    pytest.param(33, 8, 8, 4, 1, id="top1"),
    pytest.param(40, 16, 32, 6, 3, id="top3"),
    pytest.param(1, 8, 16, 4, 4, id="one-token-all-experts"),
]


@pytest.mark.parametrize("tokens, dim, inter, experts, top_k", SHAPES)
def test_matches_naive_reference_forward_and_grads(tokens, dim, inter, experts, top_k):
    moe = build_moe(dim=dim, intermediate_size=inter, num_experts=experts, top_k=top_k).train()
    x, g = randn(tokens, dim), randn(tokens, dim, seed=2)
    ours = grads_of(moe, x, moe, g)
    ref = grads_of(moe, x, lambda t: naive_moe(moe, t), g)
    for name, a, b in zip(["out", "x", "gate", "gate_up_proj", "down_proj"], ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{name} differs")
    if tokens * top_k < experts:
        assert (moe.last_tokens_per_expert == 0).any()
        idle = moe.last_tokens_per_expert == 0
        assert (ours[3][idle] == 0).all() and (ours[4][idle] == 0).all()


def test_matches_transformers_mixtral_block():
    import transformers.models.mixtral.modeling_mixtral as mixtral
    from transformers import MixtralConfig

    moe = build_moe(num_experts=8, top_k=2).eval()
    config = MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2)
    block = mixtral.MixtralSparseMoeBlock(config).eval()
    block.load_state_dict(moe.state_dict())  # our names are Mixtral's in-memory names
    x = randn(3, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), block(x), rtol=1e-5, atol=1e-5)


def test_grouped_experts_on_presorted_rows():
    """The expert-parallel entry point: rows already grouped by expert, one output row per input row."""
    moe = build_moe(num_experts=4)
    counts = torch.tensor([3, 0, 5, 2])
    x = randn(10, 16).requires_grad_(True)
    out = moe.experts(x, counts)
    gate_up, down = moe.experts.gate_up_proj, moe.experts.down_proj
    expert_of = torch.repeat_interleave(torch.arange(4), counts)
    ref = torch.stack([
        (lambda gate, up: (F.silu(gate) * up) @ down[e].t())(*(row @ gate_up[e].t()).chunk(2))
        for row, e in zip(x, expert_of.tolist(), strict=True)
    ])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = randn(10, 16, seed=3)
    got = torch.autograd.grad(out, [x, gate_up, down], g)
    want = torch.autograd.grad(ref, [x, gate_up, down], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_inference_path_equals_training_path():
    moe = build_moe().eval()
    x = randn(20, 16)
    with torch.no_grad():
        inference = moe(x)
    assert torch.equal(inference, moe(x.requires_grad_(True)).detach())


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_router_top_k_and_normalised_weights(top_k):
    moe = build_moe(top_k=top_k)
    x = randn(50, 16)
    logits, probs, weights, indices = moe.gate(x)
    torch.testing.assert_close(probs, torch.softmax(logits, dim=-1))
    # the chosen experts are the k most probable, each once
    assert torch.equal(torch.sort(indices, dim=-1).values, torch.sort(probs.topk(top_k, dim=-1).indices, -1).values)
    assert (indices.sort(-1).values.diff(dim=-1) != 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))
    chosen = probs.gather(-1, indices)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))


@pytest.mark.parametrize("top_k, tokens", [(1, 40), (2, 64), (3, 17)])
def test_aux_loss_is_switch_mixtral_formula(top_k, tokens):
    coef = 0.05
    moe = build_moe(top_k=top_k, balancing="aux_loss", aux_loss_coef=coef).train()
    x = randn(tokens, 16)
    moe(x)
    logits = F.linear(x, moe.gate.weight)
    probs = torch.softmax(logits, -1)
    counts = torch.bincount(probs.topk(top_k, -1).indices.reshape(-1), minlength=8).float()
    expected = coef * 8 * torch.sum(counts / tokens * probs.mean(0))
    torch.testing.assert_close(moe.last_aux_loss, expected)
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # a test dependency: no skip

    hf = load_balancing_loss_func((logits,), num_experts=8, top_k=top_k)
    torch.testing.assert_close(moe.last_aux_loss, coef * hf)


def test_aux_loss_gradient_reaches_router():
    """The balancing loss rides on the layer's backward: router grads equal those of (output . g) + scale * aux."""
    coef, scale = 0.1, 0.5
    moe = build_moe(balancing="aux_loss", aux_loss_coef=coef).train()
    moe.aux_loss_scale = scale
    x, g = randn(30, 16), randn(30, 16, seed=2)
    moe(x).backward(g)
    ours = moe.gate.weight.grad.clone()
    moe.zero_grad(set_to_none=True)
    logits = F.linear(x, moe.gate.weight)
    probs = torch.softmax(logits, -1)
    counts = torch.bincount(probs.topk(2, -1).indices.reshape(-1), minlength=8).float()
    aux = coef * 8 * torch.sum(counts / 30 * probs.mean(0))
    ((naive_moe(moe, x) * g).sum() + scale * aux).backward()
    torch.testing.assert_close(ours, moe.gate.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("balancing, training", [("none", True), ("bias", True), ("aux_loss", False)])
def test_no_aux_loss_when_disabled_or_in_eval(balancing, training):
    moe = build_moe(balancing=balancing).train(training)
    x = randn(8, 16, seed=5).requires_grad_(True)
    out = moe(x)
    assert float(moe.last_aux_loss) == 0.0
    out.sum().backward()  # nothing attached: the router gradient is the output's alone
    ours, ours_x = moe.gate.weight.grad.clone(), x.grad.clone()
    moe.zero_grad(set_to_none=True)
    x.grad = None
    naive_moe(moe, x).sum().backward()
    torch.testing.assert_close(ours, moe.gate.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_x, x.grad, rtol=1e-5, atol=1e-6)


def test_z_loss():
    coef = 1e-2
    moe = build_moe(balancing="none", z_loss_coef=coef, std=1.0).train()
    x = randn(24, 16)
    moe(x)
    expected = coef * torch.logsumexp(F.linear(x, moe.gate.weight), dim=-1).pow(2).mean()
    torch.testing.assert_close(moe.last_aux_loss, expected)


def test_bias_balancing_moves_load_toward_balance():
    moe = build_moe(balancing="bias", num_experts=4, top_k=1).train()
    x = randn(256, 16)
    with torch.no_grad():
        x += 3 * moe.gate.weight[0] / moe.gate.weight[0].norm()  # skew: most tokens prefer expert 0
    before = None
    for _ in range(30):
        moe(x)
        load = moe.last_tokens_per_expert.float()
        before = load if before is None else before
        update_routing_biases([moe], rate=0.02)  # from the load accumulated over this step
        moe.reset_step_stats()
    assert before.max() > 0.6 * 256  # the input really is skewed
    assert load.max() < before.max() and load.std() < 0.5 * before.std()
    assert moe.gate.expert_bias[0] < 0 < moe.gate.expert_bias[1:].max()
    # the bias steers the choice only; mixing weights stay the plain softmax probabilities, renormalised
    moe.gate.top_k = 2
    logits, probs, weights, indices = moe.gate(x)
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    assert not torch.equal(indices, probs.topk(2, -1).indices)  # the bias changed some choices
    chosen = probs.gather(-1, indices)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))


@pytest.mark.parametrize("capacity_factor, top_k", [(0.5, 2), (1.0, 1), (0.25, 3)])
def test_capacity_factor_drops_overflow(capacity_factor, top_k):
    moe = build_moe(capacity_factor=capacity_factor, top_k=top_k, num_experts=4).train()
    tokens = 40
    x, g = randn(tokens, 16), randn(tokens, 16, seed=2)
    capacity = math.ceil(capacity_factor * tokens * top_k / 4)
    assert moe.capacity(tokens) == capacity
    ours = grads_of(moe, x, moe, g)
    ref = grads_of(moe, x, lambda t: naive_moe(moe, t, capacity=capacity), g)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # something was dropped: those rows lack that expert's contribution, so they differ from the dropless output
    dropless = naive_moe(moe, x).detach()
    assert (moe.last_tokens_per_expert > capacity).any()
    assert not torch.allclose(ours[0], dropless)
    _, _, _, indices = moe.gate(x)
    kept_everything = torch.ones(tokens, dtype=torch.bool)
    for e in range(4):
        token, _ = torch.where(indices == e)
        kept_everything[token[capacity:]] = False
    torch.testing.assert_close(ours[0][kept_everything], dropless[kept_everything], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours[0][~kept_everything], dropless[~kept_everything])


def test_shared_experts_add_a_dense_path():
    moe = build_moe(n_shared_experts=1, shared_intermediate_size=12)
    x = randn(12, 16)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), naive_moe(moe, x) + moe.shared_experts(x), rtol=1e-5, atol=1e-5)
    assert moe.shared_experts.gate_proj.weight.shape == (12, 16)


@pytest.mark.parametrize("overrides", [{}, {"capacity_factor": 1.0}, {"balancing": "aux_loss", "top_k": 3}])
def test_deterministic(overrides):
    runs = []
    for _ in range(2):
        moe = build_moe(**overrides).train()
        runs.append(grads_of(moe, randn(48, 16), moe, randn(48, 16, seed=2)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_balancing_gradient_is_scaled_with_the_fp16_loss_scale(z_loss):
    """fp16 training multiplies the loss by its scale S and divides every gradient by S: the balancing loss's own
    gradient (sent into the router from inside the layer) must be multiplied by S too, or it comes out S times too
    small and balancing is off under fp16."""
    grads = {}
    for scale in (1.0, 2.0**14):
        moe = build_moe(seed=3, balancing="aux_loss", aux_loss_coef=0.5, z_loss_coef=z_loss)
        moe.train()
        moe.aux_grad_scale = scale
        (moe(randn(2, 24, 16, seed=4)).square().mean() * scale).backward()
        grads[scale] = moe.gate.weight.grad / scale
    reference, scaled = grads[1.0], grads[2.0**14]
    assert reference.abs().max() > 0
    torch.testing.assert_close(scaled, reference, rtol=1e-5, atol=1e-9)
