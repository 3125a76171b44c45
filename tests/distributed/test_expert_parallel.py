"""Expert parallelism on real gloo process groups, compared against the single-process model.

Every rank builds the same seeded model, applies EP and runs forward + backward on its slice of a global batch;
the reference runs the same slices one after another as accumulated micro-batches (loss scaled by 1/dp). Each
rank's logits must equal the reference logits of its slice, and after `reduce_expert_grads` every gradient (expert
shards gathered with `ep_unshard`) must equal the reference gradient.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from moe_platform.model.args import ModelArgs
from moe_platform.model.transformer import build_model
from moe_platform.parallel.expert_parallel import (
    _source_to_expert_order,
    apply_ep,
    ep_shard,
    ep_unshard,
    expert_param_names,
    is_expert_param,
    is_expert_tensor_name,
    reduce_expert_grads,
)
from moe_platform.parallel.layout import Layout, ProcessGroups, build_process_groups
from tinyrun import free_port

SEQ = 8
VOCAB = 64
TOL = {"atol": 1e-5, "rtol": 1e-5}


@dataclass(frozen=True)
class Case:
    name: str
    layout: Layout
    num_experts: int = 4
    seqs_per_rank: int = 2
    capacity_factor: float = 0.0
    starve: tuple[int, ...] = ()  # experts no token may pick (forced with the routing bias)
    seed: int = 0


CASES = {
    2: [
        Case("dp2·ep2", Layout(dp=2, ep=2)),
        # one short sequence per rank over 8 experts: some (source rank, expert) pairs get no rows
        Case("dp2·ep2 sparse", Layout(dp=2, ep=2), num_experts=8, seqs_per_rank=1, seed=1),
        Case("dp2·ep2 capacity1", Layout(dp=2, ep=2), capacity_factor=1.0, seed=2),
        # every expert of ep rank 1 is starved: that rank receives no rows at all
        Case("dp2·ep2 empty rank", Layout(dp=2, ep=2), num_experts=8, starve=(4, 5, 6, 7), seed=3),
    ],
    4: [
        Case("dp4·ep2", Layout(dp=4, ep=2), seed=4),
        Case("dp4·ep4", Layout(dp=4, ep=4), num_experts=8, seed=5),
        Case("dp4·ep4 capacity1", Layout(dp=4, ep=4), num_experts=8, capacity_factor=1.0, seed=6),
    ],
}


def _args(case: Case) -> ModelArgs:
    return ModelArgs(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48,
        num_experts=case.num_experts, top_k=2, max_seq_len=16, capacity_factor=case.capacity_factor,
        # starving experts needs the routing bias, which replaces the aux loss; keep an attached loss via z-loss
        balancing="bias" if case.starve else "aux_loss", z_loss_coef=1e-3 if case.starve else 0.0,
    )


def _build(case: Case):
    model = build_model(_args(case), seed=1234 + case.seed)
    for moe in model.moe_layers():
        if case.starve:
            moe.gate.expert_bias[list(case.starve)] = -10.0
    return model.train()


def _batch(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """Global batch (dp*seqs_per_rank, SEQ); rank d takes rows [d*seqs_per_rank, (d+1)*seqs_per_rank)."""
    gen = torch.Generator().manual_seed(case.seed)
    shape = (case.layout.dp * case.seqs_per_rank, SEQ)
    return torch.randint(0, VOCAB, shape, generator=gen), torch.randint(0, VOCAB, shape, generator=gen)


def _slice(case: Case, dp_rank: int) -> slice:
    return slice(dp_rank * case.seqs_per_rank, (dp_rank + 1) * case.seqs_per_rank)


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))  # (B, T, V) -> (B*T, V)


def _worker(rank: int, world: int, port: int, cases: list[Case], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        for case in cases:
            groups = build_process_groups(case.layout, rank)
            model = _build(case)
            apply_ep(model, groups)
            tokens, targets = _batch(case)
            mine = _slice(case, groups.dp_rank)
            logits = model(tokens[mine])
            _loss(logits, targets[mine]).backward()  # unscaled: reduce_expert_grads averages over dp
            reduce_expert_grads(model, groups, case.layout.dp)
            torch.save({
                "logits": logits.detach(),
                "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                "expert_names": expert_param_names(model),
                "received": [m.token_dispatcher.last_received_counts.clone() for m in model.moe_layers()],
            }, Path(out_dir) / f"{case.name}.rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _reference(case: Case):
    """The global batch as dp accumulated micro-batches on one process: per-slice logits, grads, whether any drop."""
    model = _build(case)
    dp = case.layout.dp
    for moe in model.moe_layers():
        moe.aux_loss_scale = 1.0 / dp  # the balancing loss is averaged like the main loss
    tokens, targets = _batch(case)
    logits, dropped = [], False
    for d in range(dp):
        out = model(tokens[_slice(case, d)])
        (_loss(out, targets[_slice(case, d)]) / dp).backward()
        logits.append(out.detach())
        n_tokens = case.seqs_per_rank * SEQ
        dropped |= any(int(m.last_tokens_per_expert.max()) > m.capacity(n_tokens) for m in model.moe_layers())
    return logits, {n: p.grad for n, p in model.named_parameters()}, dropped


@pytest.mark.parametrize("world", sorted(CASES), ids=lambda w: f"world{w}")
def test_expert_parallel_matches_single_process(world, tmp_path):
    cases = CASES[world]
    mp.spawn(_worker, args=(world, free_port(), cases, str(tmp_path)), nprocs=world, join=True)
    for case in cases:
        layout = case.layout
        results = [torch.load(tmp_path / f"{case.name}.rank{r}.pt") for r in range(world)]
        ref_logits, ref_grads, dropped = _reference(case)
        expected_expert = sorted(n for n in ref_grads if is_expert_tensor_name(n))
        for r, res in enumerate(results):
            coords = layout.coords(r)
            torch.testing.assert_close(res["logits"], ref_logits[coords.dp], **TOL, msg=f"{case.name} rank {r}")
            assert sorted(res["expert_names"]) == expected_expert
        for name, ref in ref_grads.items():
            for r, res in enumerate(results):
                if is_expert_tensor_name(name):
                    ep_ranks = layout.ep_group_ranks(r)
                    got = ep_unshard(name, [results[q]["grads"][name] for q in ep_ranks])
                else:
                    got = res["grads"][name]
                torch.testing.assert_close(got, ref, **TOL, msg=f"{case.name}: grad of {name} on rank {r}")
        received = torch.stack([torch.stack(res["received"]) for res in results])  # (world, layers, ep, local)
        if case.capacity_factor > 0:
            assert dropped, f"{case.name}: the capacity case should drop assignments"
        if case.name.endswith("sparse"):
            assert (received == 0).any(), f"{case.name}: expected some expert to get no rows from some rank"
        if case.starve:
            starved_rank = case.starve[0] * layout.ep // case.num_experts
            for r in range(world):
                if layout.coords(r).ep == starved_rank:
                    assert int(received[r].sum()) == 0, f"{case.name}: rank {r} should receive no rows"


# ---- no-process unit tests ---------------------------------------------------------------------------------------
def test_ep_shard_unshard_round_trip():
    full = {
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(8, 6, 4),
        "model.layers.1.mlp.experts.down_proj": torch.randn(8, 4, 3),
        "model.layers.0.mlp.gate.weight": torch.randn(8, 4),
        "model.embed_tokens.weight": torch.randn(16, 4),
    }
    for ep in (1, 2, 4, 8):
        for name, tensor in full.items():
            shards = [ep_shard(name, tensor, ep, r) for r in range(ep)]
            if is_expert_tensor_name(name):
                assert all(s.shape[0] == 8 // ep and s.is_contiguous() for s in shards)
                assert shards[-1].untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()
            else:
                assert all(s is tensor for s in shards)
            assert torch.equal(ep_unshard(name, shards), tensor)
    with pytest.raises(ValueError, match=r"8 experts .* cannot be split evenly over ep \(3\)"):
        ep_shard("model.layers.0.mlp.experts.down_proj", full["model.layers.1.mlp.experts.down_proj"], 3, 0)
    with pytest.raises(ValueError, match="disagree in shape"):
        ep_unshard("model.layers.0.mlp.experts.down_proj", [torch.zeros(2, 4, 3), torch.zeros(1, 4, 3)])


def test_source_to_expert_order():
    # (sources, experts) block sizes; rows arrive source-major and must come out expert-major
    assert _source_to_expert_order(torch.tensor([[1, 2], [0, 3]])).tolist() == [0, 1, 2, 3, 4, 5]
    counts = torch.tensor([[1, 2], [2, 1]])  # rows: s0e0, s0e1, s0e1, s1e0, s1e0, s1e1
    assert _source_to_expert_order(counts).tolist() == [0, 3, 4, 1, 2, 5]
    assert _source_to_expert_order(torch.zeros(3, 2, dtype=torch.long)).numel() == 0


def _fake_groups(layout: Layout, rank: int = 0) -> ProcessGroups:
    """ProcessGroups without torch.distributed: apply_ep runs no collective, it only needs a non-None ep group."""
    return ProcessGroups(layout=layout, rank=rank, ep=object(), dp=object(), edp=None)


def test_apply_ep_shards_and_marks_in_place():
    case = Case("unit", Layout(dp=2, ep=2), num_experts=4)
    full = _build(case)
    model = _build(case)
    apply_ep(model, _fake_groups(case.layout, rank=1))
    names = expert_param_names(model)
    assert sorted(names) == sorted(n for n, _ in model.named_parameters() if is_expert_tensor_name(n))
    full_params = dict(full.named_parameters())
    for name, p in model.named_parameters():
        if name in names:
            assert is_expert_param(p) and p.group_name == "ep_size_2" and p.is_contiguous()
            torch.testing.assert_close(p, ep_shard(name, full_params[name], 2, 1), rtol=0, atol=0)
        else:
            assert not is_expert_param(p)
            torch.testing.assert_close(p, full_params[name], rtol=0, atol=0)
    moe = model.moe_layers()[0]
    assert moe.token_dispatcher.local_expert_range == range(2, 4) and moe.gate.weight.shape[0] == 4
    with pytest.raises(ValueError, match="already has a token dispatcher"):
        apply_ep(model, _fake_groups(case.layout, rank=1))


def test_apply_ep_rejects_uneven_experts_and_skips_ep1():
    case = Case("unit", Layout(dp=4, ep=4), num_experts=6)
    model = _build(case)
    with pytest.raises(ValueError, match=r"model.num_experts \(6\) must be divisible by ep \(4\)"):
        apply_ep(model, _fake_groups(case.layout))
    assert all(m.token_dispatcher is None and m.experts.gate_up_proj.shape[0] == 6 for m in model.moe_layers())
    apply_ep(model, ProcessGroups(layout=Layout(dp=4), rank=0))
    assert expert_param_names(model) == [] and all(m.token_dispatcher is None for m in model.moe_layers())
