"""MoE layer fwd+bwd throughput: ours against DeepSpeed's MoE, a naive per-expert loop and a dense FFN, same run.

Every implementation is charged the same FLOP count, the ACTIVATED expert work:
tokens * top_k * 3 matmuls of (dim x intermediate) * 2 FLOPs * 3 (forward, input grad, weight grad).
The router GEMM (under 1% of that) is left out for all of them. Each result is also given as a fraction of the
"ceiling": one plain torch.mm of the same total shape, (tokens*top_k, dim) x (dim, 3*intermediate), forward and
backward, measured in the same run. Rounds are interleaved (one step of every implementation per round) so a
burst of load on a shared machine hits all of them alike; the table reports the median over rounds.

    python bench/moe_layer.py                # the issue's shape: d=512, 16 experts, top-2, I=1024, 4096 tokens
    moe-platform bench moe_layer --tokens 1024
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _output import add_output_args, save_result, subplots  # noqa: E402
from _training import add_shape_args  # noqa: E402
from moe_platform.model.args import ModelArgs  # noqa: E402
from moe_platform.model.moe import MoE, SwiGLU  # noqa: E402
from moe_platform.train.launch import free_port  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PEER = "deepspeed dropless"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(p, dim=512, experts=16, top_k=2, intermediate=1024, tokens=4096)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported); 2 warm-up rounds precede")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed rows (no peer ratio then)")
    p.add_argument("--only", default="", help="comma-separated name prefixes to run (the ceiling always runs)")
    p.add_argument("--seed", type=int, default=0)
    add_output_args(p, "moe_layer")
    return p.parse_args(argv)


class NaiveMoE(nn.Module):
    """Reference: the same router, then for each expert index its tokens, run SwiGLU, index_add back."""

    def __init__(self, ours: MoE):
        super().__init__()
        self.ours = ours  # shares the router and stacked expert weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, weights, indices = self.ours.gate(x)
        gate_up, down = self.ours.experts.gate_up_proj, self.ours.experts.down_proj
        inter = down.shape[-1]
        out = torch.zeros_like(x)
        for e in range(gate_up.shape[0]):
            token, slot = torch.where(indices == e)
            if token.numel() == 0:
                continue
            h = x[token] @ gate_up[e].t()  # (n, D) -> (n, 2I)
            h = F.silu(h[:, :inter]) * h[:, inter:]
            out.index_add_(0, token, (h @ down[e].t()) * weights[token, slot, None].to(x.dtype))
        return out


class MatmulCeiling(nn.Module):
    """One plain matmul with the activated expert FLOPs: (tokens*k, D) x (D, 3I)."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, dim) * dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mm(x, self.weight.t())


class FusedSwiGLU(nn.Module):
    """DeepSpeed's expert in our experts' form: one gate/up GEMM (D -> 2I), SwiGLU, down (I -> D), so the DeepSpeed
    rows compare dispatch and grouping, not the MLP's shape."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.inter = inter
        self.gate_up_proj = nn.Linear(dim, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)  # (n, D) -> (n, 2I)
        return self.down_proj(F.silu(h[..., : self.inter]) * h[..., self.inter:])


def init_deepspeed() -> None:
    """A single-process gloo group: DeepSpeed's MoE asks deepspeed.comm for its expert-parallel groups."""
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    ds_torch_backend = importlib.import_module("deepspeed.comm.torch")  # the attribute `torch` there is torch itself

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    # The shared-memory allreduce DeepSpeed JIT-compiles (minutes) on first use has nothing to do on one rank.
    with mock.patch.object(ds_torch_backend, "build_shm_op", lambda: None):
        ds_comm.init_distributed(dist_backend="gloo")  # wraps the existing torch group


def build_deepspeed(ours: MoE, args: ModelArgs, drop_tokens: bool, capacity_factor: float) -> nn.Module:
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    expert = FusedSwiGLU(args.dim, args.intermediate_size)
    layer = DeepSpeedMoE(args.dim, expert, num_experts=args.num_experts, ep_size=1, k=args.top_k,
                         capacity_factor=capacity_factor, drop_tokens=drop_tokens, use_rts=False,
                         top2_2nd_expert_sampling=False)
    layer.set_deepspeed_parallelism()
    with torch.no_grad():  # same router and experts as ours, so every layer routes identically
        layer.deepspeed_moe.gate.wg.weight.copy_(ours.gate.weight)
        for e, mlp in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            mlp.gate_up_proj.weight.copy_(ours.experts.gate_up_proj[e])
            mlp.down_proj.weight.copy_(ours.experts.down_proj[e])
    return layer


def build_implementations(opt: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """name -> (module, step(x, grad_out)) where step runs forward and backward."""
    args = ModelArgs(dim=opt.dim, num_experts=opt.experts, top_k=opt.top_k, intermediate_size=opt.intermediate,
                     n_heads=1, n_kv_heads=1, balancing="aux_loss")
    ours = MoE(args)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, args.init_std)
    capped = MoE(ModelArgs(**{**args.to_dict(), "capacity_factor": 1.0}))
    capped.load_state_dict(ours.state_dict())

    def plain(module):
        return lambda x, g: module(x).backward(g)

    def deepspeed_step(module):
        def step(x, g):
            out, l_aux, _ = module(x)
            torch.autograd.backward([out, l_aux], [g, torch.ones_like(l_aux)])
        return step

    impls = {"ours (dropless)": (ours, plain(ours)), "ours (capacity 1.0)": (capped, plain(capped))}
    if not opt.no_deepspeed and (not opt.only or "deepspeed" in opt.only):
        init_deepspeed()
        for name, drop, cf in ((PEER, False, 1.0), ("deepspeed capacity 1.0", True, 1.0)):
            layer = build_deepspeed(ours, args, drop, cf)
            impls[name] = (layer, deepspeed_step(layer))
    naive_ours = MoE(args)
    naive_ours.load_state_dict(ours.state_dict())
    naive = NaiveMoE(naive_ours)
    impls["naive per-expert loop"] = (naive, plain(naive))
    dense = SwiGLU(opt.dim, opt.top_k * opt.intermediate)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0.0, args.init_std)
    impls[f"dense FFN (I={opt.top_k * opt.intermediate})"] = (dense, plain(dense))
    ceiling = MatmulCeiling(opt.dim, 3 * opt.intermediate)
    impls["matmul ceiling"] = (ceiling, plain(ceiling))
    if opt.only:
        prefixes = tuple(p.strip() for p in opt.only.split(",")) + ("matmul ceiling",)
        impls = {name: impl for name, impl in impls.items() if name.startswith(prefixes)}
    for module, _ in impls.values():
        module.to(device=device, dtype=dtype).train()
    return impls


def inputs_for(name: str, x: torch.Tensor, g: torch.Tensor, x_wide: torch.Tensor, g_wide: torch.Tensor):
    # the ceiling multiplies tokens*k rows; everything else takes the tokens
    return (x_wide, g_wide) if name == "matmul ceiling" else (x, g)


def measure(opt: argparse.Namespace) -> dict:
    device, dtype = torch.device(opt.device), DTYPES[opt.dtype]
    load_before = os.getloadavg()[0]
    torch.manual_seed(opt.seed)
    impls = build_implementations(opt, device, dtype)
    gen = torch.Generator().manual_seed(opt.seed + 1)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    x, g = rand(opt.tokens, opt.dim), rand(opt.tokens, opt.dim)
    x_wide, g_wide = rand(opt.tokens * opt.top_k, opt.dim), rand(opt.tokens * opt.top_k, 3 * opt.intermediate)
    x.requires_grad_(True)
    x_wide.requires_grad_(True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in impls}
    for rnd in range(2 + opt.repeats):
        for name, (module, step) in impls.items():
            xi, gi = inputs_for(name, x, g, x_wide, g_wide)
            module.zero_grad(set_to_none=True)
            xi.grad = None
            sync()
            t0 = time.perf_counter()
            step(xi, gi)
            sync()
            if rnd >= 2:
                times[name].append(time.perf_counter() - t0)

    flops = opt.tokens * opt.top_k * 3 * opt.dim * opt.intermediate * 2 * 3
    ceiling_s = statistics.median(times["matmul ceiling"])
    peer_s = statistics.median(times[PEER]) if PEER in times else None
    # DeepSpeed's dropless layer pads every expert to the busiest one: its real work is experts * max(load) rows
    ours = impls.get("ours (dropless)")
    loads = ours[0].last_tokens_per_expert.tolist() if ours else []
    rows = []
    for name, ts in times.items():
        s = statistics.median(ts)
        rows.append({"name": name, "ms": s * 1e3, "ms_min": min(ts) * 1e3, "ms_max": max(ts) * 1e3,
                     "gflops": flops / s / 1e9, "frac_ceiling": ceiling_s / s,
                     "vs_deepspeed_dropless": (peer_s / s) if peer_s else None})
    return {
        "config": {k: v for k, v in vars(opt).items() if not k.startswith("out_")},
        "flops_per_step": flops,
        "ceiling_gflops": flops / ceiling_s / 1e9,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_1m_before": load_before,
        "loadavg_1m_after": os.getloadavg()[0],
        "tokens_per_expert": loads,
        "results": rows,
    }


def print_table(report: dict) -> None:
    print(f"activated expert FLOPs per fwd+bwd step: {report['flops_per_step'] / 1e9:.2f} G; "
          f"ceiling {report['ceiling_gflops']:.1f} GFLOP/s; threads {report['threads']}; "
          f"load(1m) {report['loadavg_1m_before']:.2f} before, {report['loadavg_1m_after']:.2f} after")
    if report["tokens_per_expert"]:
        loads = report["tokens_per_expert"]
        print(f"tokens per expert: min {min(loads)}, mean {sum(loads) / len(loads):.0f}, max {max(loads)}")
    print(f"{'implementation':<28} {'ms fwd+bwd':>11} {'GFLOP/s':>9} {'of ceiling':>11} {'vs DS dropless':>15}")
    for r in report["results"]:
        ratio = f"{r['vs_deepspeed_dropless']:.2f}x" if r["vs_deepspeed_dropless"] else "-"
        print(f"{r['name']:<28} {r['ms']:>11.1f} {r['gflops']:>9.1f} {r['frac_ceiling']:>11.2f} {ratio:>15}")


def plot(report: dict):
    rows = report["results"]
    c = report["config"]
    fig, ax = subplots(figsize=(9, 4.5))
    colors = ["tab:blue" if r["name"].startswith("ours") else "tab:gray" for r in rows]
    bars = ax.bar([r["name"] for r in rows], [r["frac_ceiling"] for r in rows], color=colors)
    for bar, r in zip(bars, rows, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, f"{r['gflops']:.0f}",
                ha="center", va="bottom", fontsize=8)
    ax.axhline(0.8, color="tab:red", linestyle="--", linewidth=1, label="target 0.80")
    ax.set_ylim(0, max(1.2, max(r["frac_ceiling"] for r in rows) + 0.15))
    ax.set_ylabel("fraction of matmul ceiling (fwd+bwd)")
    ax.set_title(f"MoE layer, d={c['dim']}, E={c['experts']}, top-{c['top_k']}, I={c['intermediate']}, "
                 f"{c['tokens']} tokens, {c['device']} {c['dtype']} (labels: GFLOP/s)", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    for label in ax.get_xticklabels():
        label.set(rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    opt = parse_args(argv)
    report = measure(opt)
    print_table(report)
    save_result(report, opt.out_json, opt.out_png, plot, dpi=120)  # an empty --out-json/--out-png skips that file
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
