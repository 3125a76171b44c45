"""Weight-only int8 serving (`engine.quantization: int8`) against the unquantized model, in one run.

A small MoE (dim 256, 4 layers, 8 experts top-2, vocab 2048) is trained for `--steps` steps on tinyshakespeare with
our trainer, so that perplexity means something, and exported. Then the same export is served by the engine as
float32 (the peer), bfloat16 and int8, and for each:
- perplexity on held-out text (the corpus's last 10%, never trained on) from the engine's own scoring;
- the bytes the model's weights take (int8 data and scales counted);
- decode tokens/s: `--prompts` prompts decoded together for `--tokens` tokens each (greedy, EOS ignored), best of
  `--rounds`, the variants taking turns.
Targets: int8 perplexity within 1% of float32's.

    python bench/quant.py                 # ~3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
VARIANTS = (("float32", {"dtype": "float32"}), ("bfloat16", {"dtype": "bfloat16"}),
            ("int8", {"dtype": "float32", "quantization": "int8"}))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="training steps before the export")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--held-out-texts", type=int, default=64, help="held-out pieces of 600 characters scored")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-json", default=str(REPO / "docs" / "bench_quant.json"))
    p.add_argument("--out-png", default=str(REPO / "docs" / "bench_quant.png"))
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


def decode_tokens_per_s(engine, prompts: int, tokens: int) -> float:
    from moe_platform.serving.engine import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    texts = [f"{name}:\n" for name in ("ROMEO", "JULIET", "KING", "QUEEN", "First Citizen", "MENENIUS", "HAMLET",
                                        "PETRUCHIO")] * (prompts // 8 + 1)
    start = time.perf_counter()
    engine.generate_batch(texts[:prompts], params)
    return prompts * tokens / (time.perf_counter() - start)


def main(argv=None) -> int:
    from moe_platform.serving.engine import Engine
    from moe_platform.serving.quant import model_bytes

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        export = train_export(Path(tmp), args.steps)
        texts = held_out(args.held_out_texts)
        engines = {name: Engine.from_pretrained(export, max_batch_size=args.prompts, batch_wait_timeout_s=0.0,
                                                **opts) for name, opts in VARIANTS}
        rows = {name: {"variant": name, "perplexity": math.exp(engine.score(texts)),
                       "weight_bytes": model_bytes(engine.model), "tokens_per_s": 0.0}
                for name, engine in engines.items()}
        for r in range(args.rounds):
            for name, engine in engines.items():
                rows[name]["tokens_per_s"] = max(rows[name]["tokens_per_s"],
                                                 decode_tokens_per_s(engine, args.prompts, args.tokens))
            print(f"round {r + 1}: " + ", ".join(f"{n} {rows[n]['tokens_per_s']:.0f} tok/s" for n in rows), flush=True)
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
                "results": list(rows.values()),
                "target": "int8 perplexity within 1% of float32", "met": abs(int8["perplexity_vs_fp32"] - 1) <= 0.01}
    print(f"int8 perplexity ÷ float32: {int8['perplexity_vs_fp32']:.4f}; target within 1%: "
          f"{'met' if recorded['met'] else 'not met'}")
    Path(args.out_json).write_text(json.dumps(recorded, indent=2))
    plot(recorded, Path(args.out_png))
    return 0


def plot(recorded: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = recorded["results"]
    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, key, label in zip(axes, ("perplexity_vs_fp32", "bytes_vs_fp32", "tokens_per_s_vs_fp32"),
                              ("held-out perplexity ÷ float32", "weight bytes ÷ float32",
                               "decode tokens/s ÷ float32"), strict=True):
        ax.bar(names, [r[key] for r in rows], color=["tab:gray", "tab:orange", "tab:blue"])
        for i, r in enumerate(rows):
            ax.annotate(f"{r[key]:.3f}", (i, r[key]), ha="center", va="bottom", fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.suptitle("weight-only quantization for serving (same export, same run)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
