"""What the training benchmarks share: the model and batch shape as command-line options, and the config overrides
of one benchmark run (checkpoints, export and evaluation off unless the benchmark turns them on). Not a benchmark
itself (a leading underscore keeps it out of `moe-platform bench`)."""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def add_shape_args(p: argparse.ArgumentParser, global_batch: int = 8, max_bytes: int = 300_000) -> None:
    """Model and batch shape (dim 128, 4 layers, 16 experts top-2 by default) and the corpus."""
    p.add_argument("--global-batch", type=int, default=global_batch)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--max-bytes", type=int, default=max_bytes, help="corpus bytes to tokenize")
    p.add_argument("--corpus", default=None, help="text file (default: tinyshakespeare beside the checkout, "
                                                  "else the Python standard library's sources)")


def run_overrides(args: argparse.Namespace, storage: Path, name: str, micro_batch_size: int,
                  **extra: object) -> list[str]:
    """`--section.key=value` overrides of one run named `name` in `storage` with the shape in `args`;
    `extra` ({"checkpoint.interval": 10, ...}) adds or replaces keys."""
    corpus = args.corpus or (str(SHAKESPEARE) if SHAKESPEARE.exists() else "")
    values: dict[str, object] = {
        "run.name": name, "run.storage_path": storage, "data.path": corpus, "data.vocab_size": 2048,
        "data.max_bytes": args.max_bytes, "data.cache_dir": storage / "cache",
        "model.dim": args.dim, "model.n_layers": args.layers, "model.n_heads": 4, "model.n_kv_heads": 2,
        "model.intermediate_size": args.intermediate, "model.num_experts": args.experts, "model.top_k": 2,
        "train.steps": args.steps, "train.global_batch_size": args.global_batch,
        "train.micro_batch_size": micro_batch_size, "train.seq_len": args.seq_len, "train.warmup": 1,
        "train.eval_interval": 0, "checkpoint.interval": 0, "checkpoint.export": "false",
        **extra,
    }
    return [f"--{k}={v}" for k, v in values.items()]
