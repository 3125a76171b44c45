"""Tensor parallelism against the single-process model: real gloo groups of 2 and 4 CPU processes.

Every rank builds the same seeded model, applies TP and runs forward + backward (train mode, so the balancing loss
reaches the router) on the same batch; the parent rebuilds full gradients from the shards with `unshard_tensors` and
compares logits, loss and every gradient with the single-device run. Unit tests (no processes) cover the name-based
sharding rules that checkpoint resharding relies on.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from moe_platform.model.args import ModelArgs
from moe_platform.model.transformer import build_model
from moe_platform.parallel.comm import copy_to_group, gather_from_group, reduce_from_group, scatter_to_group
from moe_platform.parallel.layout import Layout, ProcessGroups, build_process_groups
from moe_platform.parallel.tensor_parallel import apply_tp, shard_tensor, tp_shard_spec, unshard_tensors
from tinyrun import free_port

TINY = dict(dim=32, n_layers=2, n_heads=4, intermediate_size=48, num_experts=4, top_k=2, vocab_size=64,
            max_seq_len=32)
SEED = 0

# world size -> (layout, model overrides) run one after another in the same processes (spawning is the slow part)
CASES = {
    2: [
        (Layout(tp=2), dict(n_kv_heads=2)),
        (Layout(tp=2), dict(n_kv_heads=2, n_shared_experts=1, z_loss_coef=1e-3)),
    ],
    4: [
        (Layout(tp=4), dict(n_kv_heads=4, n_shared_experts=1)),
        (Layout(dp=2, tp=2), dict(n_kv_heads=2, n_shared_experts=1, capacity_factor=1.0)),
    ],
}


def _args(**overrides) -> ModelArgs:
    return ModelArgs(**{**TINY, **overrides})


def _batch(args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab_size, (2, 12), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _step(model, args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    inputs, targets = _batch(args)
    logits = model(inputs)  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    return logits.detach(), loss.detach()


def _comm_results(group) -> dict:
    """Values and gradients of the four collectives on rank-dependent inputs, for the parent to check."""
    rank = dist.get_rank(group)
    out = {}
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    y = gather_from_group(x, group, dim=1)  # (2, 3) -> (2, 3*tp)
    (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    out["gather"], out["gather_grad"] = y.detach(), x.grad
    full = torch.arange(24.0).view(2, 12).requires_grad_()
    s = scatter_to_group(full, group, dim=-1)
    (s * (rank + 1)).sum().backward()
    out["scatter"], out["scatter_grad"] = s.detach(), full.grad
    x = torch.full((3,), float(rank + 1), requires_grad=True)
    r = reduce_from_group(x * 1.0, group)
    (r * (rank + 1)).sum().backward()
    out["reduce"], out["reduce_grad"] = r.detach(), x.grad
    x = torch.ones(3, requires_grad=True)
    (copy_to_group(x, group) * (rank + 1)).sum().backward()
    out["copy_grad"] = x.grad
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for i, (layout, overrides) in enumerate(CASES[world]):
            groups = build_process_groups(layout, rank)
            args = _args(**overrides)
            model = build_model(args, seed=SEED)
            apply_tp(model, groups)
            logits, loss = _step(model, args)
            result = {
                "tp_rank": groups.tp_rank,
                "logits": logits,
                "loss": loss,
                "grads": {n: p.grad for n, p in model.named_parameters()},
                "marks": {n: (p.tensor_model_parallel, getattr(p, "partition_dim", None))
                          for n, p in model.named_parameters()},
                "state_dict_keys": list(model.state_dict()),
            }
            if i == 0:
                result["comm"] = _comm_results(groups.tp)
            torch.save(result, Path(out_dir) / f"case{i}_rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", sorted(CASES))
def test_tp_matches_single_process(world, tmp_path):
    # mp.spawn re-raises the first worker failure with that worker's traceback.
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    for i, (layout, overrides) in enumerate(CASES[world]):
        args = _args(**overrides)
        ref = build_model(args, seed=SEED)
        ref_logits, ref_loss = _step(ref, args)
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        results = [torch.load(tmp_path / f"case{i}_rank{r}.pt") for r in range(world)]
        case = f"{layout} {overrides}"
        for res in results:
            assert res["state_dict_keys"] == list(ref.state_dict()), case
            _assert_close(res["logits"], ref_logits, f"{case} logits", atol=1e-5)
            _assert_close(res["loss"], ref_loss, f"{case} loss", atol=0.0, rtol=1e-6)
        for members in layout.all_groups("tp"):
            shards = [results[r] for r in members]
            assert [s["tp_rank"] for s in shards] == list(range(layout.tp))
            for name, ref_grad in ref_grads.items():
                spec = tp_shard_spec(name, ref_grad.shape, layout.tp)
                for s in shards:
                    assert s["marks"][name] == ((True, spec[0]) if spec else (False, None)), (case, name)
                full = unshard_tensors(name, [s["grads"][name] for s in shards])
                _assert_close(full, ref_grad, f"{case} grad of {name}", atol=1e-5)
                if spec is None:  # replicated parameters must agree exactly on every tp rank
                    for s in shards[1:]:
                        torch.testing.assert_close(s["grads"][name], shards[0]["grads"][name], atol=1e-6, rtol=0)
    _check_comm([torch.load(tmp_path / f"case0_rank{r}.pt")["comm"] for r in range(CASES[world][0][0].tp)])


def _assert_close(actual, expected, what: str, atol: float, rtol: float = 0.0) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _check_comm(per_rank: list[dict]) -> None:
    tp = len(per_rank)
    ranks = sum(range(1, tp + 1))  # sum over ranks of (rank + 1)
    gathered = torch.cat([torch.full((2, 3), float(r + 1)) for r in range(tp)], dim=1)
    weights = torch.arange(2 * 3 * tp, dtype=torch.float32).view(2, 3 * tp)
    for r, res in enumerate(per_rank):
        torch.testing.assert_close(res["gather"], gathered)
        torch.testing.assert_close(res["gather_grad"], weights.chunk(tp, dim=1)[r])
        torch.testing.assert_close(res["scatter"], torch.arange(24.0).view(2, 12).chunk(tp, dim=1)[r])
        scatter_grad = torch.cat([torch.full((2, 12 // tp), float(q + 1)) for q in range(tp)], dim=1)
        torch.testing.assert_close(res["scatter_grad"], scatter_grad)
        torch.testing.assert_close(res["reduce"], torch.full((3,), float(ranks)))
        torch.testing.assert_close(res["reduce_grad"], torch.full((3,), float(r + 1)))
        torch.testing.assert_close(res["copy_grad"], torch.full((3,), float(ranks)))


# ---- unit tests: no processes ---------------------------------------------------------------------------------
def _expected_spec(name: str):
    table = {
        ".self_attn.q_proj.weight": (0, "contiguous"), ".self_attn.k_proj.weight": (0, "contiguous"),
        ".self_attn.v_proj.weight": (0, "contiguous"), ".self_attn.o_proj.weight": (1, "contiguous"),
        ".mlp.experts.gate_up_proj": (1, "gate_up"), ".mlp.experts.down_proj": (2, "contiguous"),
        ".mlp.shared_experts.gate_proj.weight": (0, "contiguous"),
        ".mlp.shared_experts.up_proj.weight": (0, "contiguous"),
        ".mlp.shared_experts.down_proj.weight": (1, "contiguous"),
    }
    return next((spec for suffix, spec in table.items() if name.endswith(suffix)), None)


@pytest.mark.parametrize("n_kv_heads,tp", [(2, 2), (4, 4)])
def test_shard_spec_and_round_trip_for_every_parameter(n_kv_heads, tp):
    model = build_model(_args(n_kv_heads=n_kv_heads, n_shared_experts=1), seed=SEED)
    sharded = 0
    for name, p in model.state_dict().items():
        spec = tp_shard_spec(name, p.shape, tp)
        assert spec == _expected_spec(name), name
        assert tp_shard_spec("module." + name, p.shape, tp) == spec  # wrapper prefixes are ignored
        shards = [shard_tensor(name, p, tp, r) for r in range(tp)]
        if spec is None:
            assert all(s is p for s in shards)
        else:
            sharded += 1
            dim, _ = spec
            assert all(s.shape[dim] * tp == p.shape[dim] for s in shards)
            assert all(s.untyped_storage().data_ptr() != p.untyped_storage().data_ptr() for s in shards)
        assert torch.equal(unshard_tensors(name, shards), p), name
    assert sharded == 2 * (4 + 2 + 3)  # per layer: q/k/v/o, gate_up/down, shared gate/up/down


def test_gate_up_shards_keep_both_halves():
    full = torch.arange(8.0).view(1, 8, 1)  # (E=1, 2I=8, D=1): gate rows 0..3, up rows 4..7
    shard = shard_tensor("model.layers.0.mlp.experts.gate_up_proj", full, 2, 1)
    assert shard.flatten().tolist() == [2.0, 3.0, 6.0, 7.0]  # [gate_local; up_local]


def test_spec_errors_name_the_constraint():
    with pytest.raises(ValueError, match="intermediate_size must be divisible by tp"):
        tp_shard_spec("model.layers.0.mlp.experts.gate_up_proj", (4, 2 * 6, 32), 4)  # I=6 over tp=4
    with pytest.raises(ValueError, match="n_heads and model.n_kv_heads"):
        tp_shard_spec("model.layers.0.self_attn.k_proj.weight", (16, 32), 3)
    with pytest.raises(ValueError, match="same shape"):
        unshard_tensors("model.layers.0.self_attn.q_proj.weight", [torch.zeros(2, 3), torch.zeros(3, 3)])
    with pytest.raises(ValueError, match="tp_rank 2 out of range"):
        shard_tensor("model.layers.0.self_attn.q_proj.weight", torch.zeros(4, 4), 2, 2)
    assert tp_shard_spec("model.layers.0.mlp.gate.weight", (4, 32), 3) is None  # the router stays replicated


def _fake_groups(layout: Layout, rank: int) -> ProcessGroups:
    # apply_tp only captures the group object for its hooks; no collective runs until forward.
    return ProcessGroups(layout=layout, rank=rank, tp=object() if layout.tp > 1 else None)


def test_apply_tp_shards_like_shard_tensor_and_keeps_names():
    args = _args(n_kv_heads=2, n_shared_experts=1)
    full = build_model(args, seed=SEED)
    model = build_model(args, seed=SEED)
    apply_tp(model, _fake_groups(Layout(tp=2), rank=1))
    assert list(model.state_dict()) == list(full.state_dict())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), shard_tensor(name, full.get_parameter(name).detach(), 2, 1))
        spec = tp_shard_spec(name, full.get_parameter(name).shape, 2)
        assert p.tensor_model_parallel is (spec is not None), name
    attn = model.model.layers[0].self_attn
    assert (attn.n_heads, attn.n_kv_heads, attn.q_proj.out_features) == (2, 1, 16)
    with pytest.raises(ValueError, match="already applied"):
        apply_tp(model, _fake_groups(Layout(tp=2), rank=1))


def test_apply_tp_rejects_bad_layouts_before_changing_anything():
    model = build_model(_args(n_kv_heads=2), seed=SEED)
    before = {n: p.shape for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="n_kv_heads=2, tp=4"):
        apply_tp(model, _fake_groups(Layout(tp=4), rank=0))
    assert {n: p.shape for n, p in model.named_parameters()} == before
    with pytest.raises(ValueError, match="ProcessGroups.tp is None"):
        apply_tp(model, ProcessGroups(layout=Layout(tp=2), rank=0))
    apply_tp(model, _fake_groups(Layout(), rank=0))  # tp=1: markers only
    assert not any(p.tensor_model_parallel for p in model.parameters())
    x = torch.randn(3)
    assert copy_to_group(x, None) is x and reduce_from_group(x, None) is x
    assert gather_from_group(x, None) is x and scatter_to_group(x, None) is x
