"""Peak memory of a training step (forward + backward) with each activation-checkpointing mode, side by side in one
run: ours with train.activation_checkpointing = none, full and selective, and the peer, transformers' own
MixtralForCausalLM of the same shape without and with `gradient_checkpointing_enable()`.

Each case runs in a fresh process: one warm-up step (gradients allocated), then measured steps. The figures:
- peak memory of the step above the memory before it: on CUDA `torch.cuda.max_memory_allocated`, on CPU the
  process's peak resident set (VmHWM, reset through /proc/self/clear_refs before each step; glibc is told to map
  large blocks and unmap them when freed, so the resident set follows the live tensors);
- the activation bytes autograd saves for backward (`saved_tensors_hooks`: each storage once, weights left out),
  what checkpointing trades away;
- the step time, which recomputation raises.
Ratios are against "none" of the same implementation.

    python bench/memory.py                 # d=256, 12 layers, 8 experts top-2, batch 4 x 512 tokens
    python bench/memory.py --device cuda --dim 1024 --layers 16 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO / "bench"))

from _output import add_output_args, save_result, subplots  # noqa: E402
from _peak import peak_bytes, reset_peak, run_case  # noqa: E402
from _training import add_shape_args  # noqa: E402

CASES = [("ours", "none"), ("ours", "full"), ("ours", "selective"), ("transformers", "none"),
         ("transformers", "full")]
# the options each case process is given, and the args recorded in the JSON
RECORDED = ("dim", "layers", "experts", "intermediate", "vocab", "batch", "seq", "steps", "device")


def _worker(args) -> dict:
    import torch

    from moe_platform.checkpoint.hf import ARCHITECTURES, hf_config
    from moe_platform.model.args import ModelArgs
    from moe_platform.model.transformer import build_model

    torch.manual_seed(0)
    device = torch.device(args.device)
    margs = ModelArgs(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=4,
                      intermediate_size=args.intermediate, num_experts=args.experts, top_k=2, max_seq_len=args.seq,
                      aux_loss_coef=0.0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    if args.impl == "ours":
        model = build_model(margs, device=device, seed=0).train()
        model.set_activation_checkpointing(args.mode)

        def loss_fn():
            logits = model(tokens)
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    else:
        import transformers

        mixtral = hf_config(margs, ARCHITECTURES["MixtralForCausalLM"])
        config = transformers.MixtralConfig(**{k: v for k, v in mixtral.items()
                                               if k not in ("architectures", "model_type")})
        config._attn_implementation = "sdpa"
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).train()
        if args.mode == "full":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False

        def loss_fn():
            return model(input_ids=tokens, labels=tokens, use_cache=False).loss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def step() -> tuple[float, int, int, int]:
        storages: dict[int, int] = {}

        def pack(t):  # each activation storage once; weights saved for backward are not activations
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                storages[ptr] = max(storages.get(ptr, 0), t.untyped_storage().nbytes())
            return t

        before = reset_peak(device)
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn()
        loss.backward()
        peak = peak_bytes(device)
        dt = time.perf_counter() - t0
        model.zero_grad(set_to_none=False)  # keep the gradient buffers: every measured step starts alike
        return dt, peak - before, sum(storages.values()), before

    step()
    runs = [step() for _ in range(args.steps)]
    return {"impl": args.impl, "mode": args.mode, "step_s": statistics.median(r[0] for r in runs),
            "peak_bytes": max(r[1] for r in runs), "saved_bytes": runs[-1][2], "base_bytes": runs[-1][3],
            "params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p, dim=256, layers=12, experts=8, intermediate=512, vocab=4096, batch=4, seq=512)
    p.add_argument("--steps", type=int, default=2, help="measured steps per case (after one warm-up step)")
    p.add_argument("--device", default="cpu")
    add_output_args(p, "memory")
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.impl:  # one case, in its own process
        print(json.dumps(_worker(args)))
        return 0
    shape = [f"--{k}={getattr(args, k)}" for k in RECORDED]
    results = []
    for impl, mode in CASES:
        r = run_case(__file__, [*shape, f"--impl={impl}", f"--mode={mode}"], f"{impl} {mode}")
        results.append(r)
        print(f"{impl:>12} {mode:>9}: peak +{r['peak_bytes'] / 2**20:7.1f} MiB, saved for backward "
              f"{r['saved_bytes'] / 2**20:7.1f} MiB, step {r['step_s']:.2f} s", flush=True)
    for r in results:
        none = next(x for x in results if x["impl"] == r["impl"] and x["mode"] == "none")
        r.update(peak_vs_none=r["peak_bytes"] / none["peak_bytes"], saved_vs_none=r["saved_bytes"] /
                 none["saved_bytes"], time_vs_none=r["step_s"] / none["step_s"])
    ours_sel = next(r for r in results if r["impl"] == "ours" and r["mode"] == "selective")
    ours_full = next(r for r in results if r["impl"] == "ours" and r["mode"] == "full")
    hf_full = next(r for r in results if r["impl"] == "transformers" and r["mode"] == "full")
    summary = {"full_vs_transformers_full_peak": ours_full["peak_bytes"] / hf_full["peak_bytes"],
               "selective_peak_vs_none": ours_sel["peak_vs_none"], "full_peak_vs_none": ours_full["peak_vs_none"]}
    print(f"peak ÷ none: ours full {ours_full['peak_vs_none']:.3f}, selective {ours_sel['peak_vs_none']:.3f}, "
          f"transformers full {hf_full['peak_vs_none']:.3f}; ours full ÷ transformers full "
          f"{summary['full_vs_transformers_full_peak']:.3f}")
    save_result({"args": {k: getattr(args, k) for k in RECORDED}, "results": results, **summary}, args.out_json,
                args.out_png, plot)
    return 0


def plot(result: dict):
    results, a = result["results"], result["args"]
    fig, ax = subplots(figsize=(8, 3.8))
    labels = [f"{r['impl']}\n{r['mode']}" for r in results]
    ax.bar(labels, [r["peak_bytes"] / 2**20 for r in results],
           color=["tab:green" if r["impl"] == "ours" else "tab:gray" for r in results])
    ax.set_ylabel(f"peak step memory, MiB ({a['device']})")
    ax.set_title(f"activation checkpointing, d={a['dim']} L={a['layers']} E={a['experts']} "
                 f"{a['batch']}x{a['seq']} tokens")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
