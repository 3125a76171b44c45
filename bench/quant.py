"""Weight-only int8 and int4 serving (`engine.quantization`) against the unquantized model, in one run.

A small MoE (dim 256, 4 layers, 8 experts top-2, vocab 2048) is trained for `--steps` steps on tinyshakespeare with
our trainer, so that perplexity means something, and exported. Then the same export is served by the engine as
float32 (the peer), bfloat16, int8 and int4, and for each:
- perplexity on held-out text (the corpus's last 10%, never trained on) from the engine's own scoring;
- the bytes the model's weights take (int8/int4 data and scales counted);
- decode tokens/s: `--prompts` prompts decoded together for `--tokens` tokens each (greedy, EOS ignored), best of
  `--rounds`, the variants taking turns;
- that speed against the memory-bandwidth ceiling: every step must read the weights it uses (the dense weights and
  output head whole, and the routed experts that step's tokens chose, counted per layer) and the KV cache of its
  sequences. Those bytes over the device's bandwidth, measured in the same run as a large on-device copy, give the
  fastest the decode could go; "of ceiling" is that time over the measured time.
Targets: int8 perplexity within 1% of float32's.

    python bench/quant.py                 # ~3 minutes on 2 CPU cores
    python bench/quant.py --device cuda   # the same on a GPU (scripts/gpu-check.sh)
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _output import add_output_args, save_result, subplots  # noqa: E402

CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
VARIANTS = (("float32", {"dtype": "float32"}), ("bfloat16", {"dtype": "bfloat16"}),
            ("int8", {"dtype": "float32", "quantization": "int8"}),
            ("int4", {"dtype": "float32", "quantization": "int4"}))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="training steps before the export")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--held-out-texts", type=int, default=64, help="held-out pieces of 600 characters scored")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the engines serve")
    add_output_args(p, "quant")
    return p.parse_args(argv)


def train_export(root: Path, steps: int) -> Path:
    from moe_platform.config import load_config
    from moe_platform.train.trainer import train

    text = CORPUS.read_text()
    (root / "train.txt").write_text(text[: int(len(text) * 0.9)])
    overrides = {
        "run.name": "quant", "run.storage_path": str(root), "data.path": str(root / "train.txt"),
        "data.vocab_size": 2048, "data.cache_dir": str(root / "cache"), "data.val_fraction": 0.0,
        "model.dim": 256, "model.n_layers": 4, "model.n_heads": 8, "model.n_kv_heads": 4,
        "model.intermediate_size": 512, "model.num_experts": 8, "model.top_k": 2, "model.max_seq_len": 256,
        "train.steps": steps, "train.global_batch_size": 16, "train.micro_batch_size": 16, "train.seq_len": 128,
        "train.warmup": 20, "train.lr": 3e-3, "train.eval_interval": 0, "checkpoint.interval": 0,
    }
    cfg = load_config(None, [f"--{k}={v}" for k, v in overrides.items()])
    return Path(train(cfg, progress=True).export_dir)


def held_out(n: int) -> list[str]:
    text = CORPUS.read_text()
    tail = text[int(len(text) * 0.9):]
    step = max(600, (len(tail) - 600) // n)
    return [tail[i:i + 600] for i in range(0, step * n, step)][:n]


def bandwidth(device: torch.device) -> float:
    """Bytes/s of a 256 MiB on-device copy (read + write), best of 5."""
    x = torch.ones(64 << 20, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        y.copy_(x)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * x.numel() * 4 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_reads(engine) -> tuple[float, float, float]:
    """(dense bytes a decode step reads whole: attention, norms, router, shared experts and the head; bytes of one
    routed expert of a layer; KV bytes of one cached token)."""
    from moe_platform.serving.cache import PagedKVCache
    from moe_platform.serving.quant import model_bytes

    model = engine.model
    experts = [layer.mlp.experts for layer in model.model.layers]
    dense = model_bytes(model) - sum(model_bytes(e) for e in experts) - model_bytes(model.model.embed_tokens)
    per_expert = model_bytes(experts[0]) / engine.args.num_experts
    return dense, per_expert, PagedKVCache.bytes_per_token(engine.args, engine.runner.dtype)


def step_bytes(engine, reads: tuple[float, float, float]) -> float:
    """Bytes the decode forward of the engine's last step had to read: the dense weights and the head, the routed
    experts its tokens chose (per layer), and its sequences' KV cache."""
    dense, per_expert, per_token = reads
    touched = sum(int((moe.last_tokens_per_expert > 0).sum()) for moe in engine.runner._moe_layers)
    return dense + touched * per_expert + sum(s.num_computed for s in engine.scheduler.running) * per_token


def decode_run(engine, prompts: int, tokens: int) -> tuple[float, float]:
    """(tokens/s, the bytes its decode steps had to read)."""
    from moe_platform.serving.engine import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    texts = [f"{name}:\n" for name in ("ROMEO", "JULIET", "KING", "QUEEN", "First Citizen", "MENENIUS", "HAMLET",
                                        "PETRUCHIO")] * (prompts // 8 + 1)
    for text in texts[:prompts]:
        engine.add_request(text, params)
    reads = weight_reads(engine)
    read, generated = 0.0, 0
    _sync(engine.device)
    start = time.perf_counter()
    while engine.has_unfinished():
        generated += sum(len(o.token_ids) for o in engine.step())
        if engine.stats()["decode_batch_size"]:
            read += step_bytes(engine, reads)
    _sync(engine.device)
    return generated / (time.perf_counter() - start), read


def main(argv=None) -> int:
    from moe_platform.serving.engine import Engine
    from moe_platform.serving.quant import model_bytes

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        export = train_export(Path(tmp), args.steps)
        texts = held_out(args.held_out_texts)
        engines = {name: Engine.from_pretrained(export, max_batch_size=args.prompts, batch_wait_timeout_s=0.0,
                                                device=args.device, kv_cache_memory_bytes=256 << 20, **opts)
                   for name, opts in VARIANTS}
        rows = {name: {"variant": name, "perplexity": math.exp(engine.score(texts)),
                       "weight_bytes": model_bytes(engine.model), "tokens_per_s": 0.0, "of_ceiling": 0.0}
                for name, engine in engines.items()}
        bytes_per_s = bandwidth(device)
        print(f"{device} copy bandwidth: {bytes_per_s / 1e9:.1f} GB/s", flush=True)
        for r in range(args.rounds):
            for name, engine in engines.items():
                tokens_per_s, read = decode_run(engine, args.prompts, args.tokens)
                if tokens_per_s > rows[name]["tokens_per_s"]:
                    ceiling_s = read / bytes_per_s
                    rows[name].update(tokens_per_s=tokens_per_s, of_ceiling=ceiling_s * tokens_per_s /
                                      (args.prompts * args.tokens))
            print(f"round {r + 1}: " + ", ".join(f"{n} {rows[n]['tokens_per_s']:.0f} tok/s "
                                                 f"({rows[n]['of_ceiling']:.2f} of ceiling)" for n in rows),
                  flush=True)
    base = rows["float32"]
    for row in rows.values():
        row["perplexity_vs_fp32"] = row["perplexity"] / base["perplexity"]
        row["bytes_vs_fp32"] = row["weight_bytes"] / base["weight_bytes"]
        row["tokens_per_s_vs_fp32"] = row["tokens_per_s"] / base["tokens_per_s"]
        print(f"{row['variant']}: perplexity {row['perplexity']:.3f} ({row['perplexity_vs_fp32']:.4f}x float32), "
              f"weights {row['weight_bytes'] / 2**20:.1f} MiB ({row['bytes_vs_fp32']:.3f}x), "
              f"{row['tokens_per_s']:.0f} tok/s ({row['tokens_per_s_vs_fp32']:.3f}x)")
    int8 = rows["int8"]
    recorded = {"args": {k: v for k, v in vars(args).items() if not k.startswith("out_")},
                "bandwidth_bytes_per_s": bytes_per_s, "results": list(rows.values()),
                "target": "int8 perplexity within 1% of float32", "met": abs(int8["perplexity_vs_fp32"] - 1) <= 0.01}
    print(f"int8 perplexity ÷ float32: {int8['perplexity_vs_fp32']:.4f}; target within 1%: "
          f"{'met' if recorded['met'] else 'not met'}")
    save_result(recorded, args.out_json, args.out_png, plot, dpi=110)
    return 0


def plot(recorded: dict):
    rows = recorded["results"]
    names = [r["variant"] for r in rows]
    fig, axes = subplots(1, 3, figsize=(11, 3.4))
    for ax, key, label in zip(axes, ("perplexity_vs_fp32", "bytes_vs_fp32", "tokens_per_s_vs_fp32"),
                              ("held-out perplexity ÷ float32", "weight bytes ÷ float32",
                               "decode tokens/s ÷ float32"), strict=True):
        ax.bar(names, [r[key] for r in rows], color=["tab:gray", "tab:orange", "tab:blue", "tab:green"][:len(rows)])
        for i, r in enumerate(rows):
            ax.annotate(f"{r[key]:.3f}", (i, r[key]), ha="center", va="bottom", fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.suptitle("weight-only quantization for serving (same export, same run)")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
