"""What the training benchmarks share: the model and batch shape as command-line options (every benchmark that has
them takes them from `add_shape_args`), and the config overrides of one benchmark run (checkpoints, export and
evaluation off unless the benchmark turns them on). Not a benchmark itself (a leading underscore keeps it out of
`moe-platform bench`)."""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

# Every shape option a benchmark may take, in the order they are added: (keyword and option name, help).
SHAPE_OPTIONS = (
    ("global_batch", "sequences per optimizer step, all ranks together"),
    ("seq_len", "tokens per training sequence"),
    ("dim", "model width"),
    ("layers", "transformer layers"),
    ("experts", "routed experts per MoE layer"),
    ("top_k", "experts each token is routed to"),
    ("intermediate", "hidden size of an expert's MLP"),
    ("moe_intermediate", "hidden size of an expert's MLP (moe_intermediate_size of the HF config)"),
    ("vocab", "vocabulary size"),
    ("batch", "sequences per step"),
    ("seq", "tokens per sequence"),
    ("tokens", "tokens per step"),
    ("max_bytes", "corpus bytes to tokenize"),
)
# The shape of a training run through `run_overrides`: d=128, 4 layers, 16 experts top-2, 8 x 128 tokens a step.
RUN_SHAPE = {"global_batch": 8, "seq_len": 128, "dim": 128, "layers": 4, "experts": 16, "intermediate": 256,
             "max_bytes": 300_000, "corpus": True}


def add_shape_args(p: argparse.ArgumentParser, *, corpus: bool = False, **defaults: int) -> None:
    """The model and batch shape options of one benchmark, each with the default given (`dim=512` adds --dim,
    default 512; an option not given, or given None, is left out); `corpus=True` adds --corpus, the text file.
    The names are those of SHAPE_OPTIONS (`moe_intermediate` is --moe-intermediate)."""
    helps = dict(SHAPE_OPTIONS)
    if unknown := sorted(defaults.keys() - helps.keys()):
        raise TypeError(f"add_shape_args: no shape option {unknown}; the options are {sorted(helps)}")
    group = p.add_argument_group("model and batch shape")
    for name, text in SHAPE_OPTIONS:
        if defaults.get(name) is not None:
            group.add_argument(f"--{name.replace('_', '-')}", type=int, default=defaults[name],
                               help=f"{text} (default %(default)s)")
    if corpus:
        group.add_argument("--corpus", default=None, help="text file (default: tinyshakespeare beside the checkout, "
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
