"""Tokens/s per parallel layout on this machine, and the measured pipeline bubble against 1F1B theory.

Every layout trains the same model on the same global batch for the same steps (real processes, gloo on CPU or NCCL
on GPU). The bubble of a pipeline layout is measured as 1 - (single-process step time / pp) / (pipeline step time):
the share of each stage's wall time not spent on its 1/pp of the work, compared with (pp - 1) / (m + pp - 1).

    python bench/layouts.py --steps 12 --layouts dp1 dp2 tp2 pp2 dp2-ep2 pp2-m8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO / "bench"))

from _output import add_output_args, save_result, subplots  # noqa: E402
from _training import RUN_SHAPE, add_shape_args, run_overrides  # noqa: E402
from moe_platform.config import load_config  # noqa: E402
from moe_platform.train.launch import launch_local  # noqa: E402
from moe_platform.train.metrics import MetricsLog  # noqa: E402


def parse_layout(name: str) -> dict[str, int]:
    """'dp2-pp2-ep2' -> {'dp': 2, 'pp': 2, 'ep': 2}; 'm8' sets micro-batches per step for pipelines."""
    out = {}
    for part in name.split("-"):
        key, value = part.rstrip("0123456789"), part[len(part.rstrip("0123456789")):]
        if key not in ("dp", "tp", "pp", "ep", "m") or not value:
            raise ValueError(f"bad layout {name!r}: parts are dpN, tpN, ppN, epN, mN")
        out[key] = int(value)
    return out


def run_layout(name: str, args, storage: Path) -> dict:
    degrees = parse_layout(name)
    micro = degrees.pop("m", args.micro_batches)
    mbs = args.global_batch // micro
    overrides = run_overrides(args, storage, name, mbs, **{f"parallel.{k}": v for k, v in degrees.items()})
    cfg = load_config(None, overrides)
    result = launch_local(cfg, progress=False)
    recs = MetricsLog(result.run_dir / "metrics.jsonl").read()[args.warmup_steps:]
    step_s = statistics.median(r["step_time_s"] for r in recs)
    return {"layout": result.layout, "name": name, "pp": degrees.get("pp", 1),
            "micro_batches_per_rank": cfg.train.global_batch_size // (mbs * degrees.get("dp", 1)),
            "step_s": step_s, "tokens_per_s": cfg.train.global_batch_size * cfg.train.seq_len / step_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="+", default=["dp1", "dp2", "tp2", "pp2", "dp2-ep2", "pp2-m8", "pp2-m2"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup-steps", type=int, default=3, help="first steps left out of the median")
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step (default 4)")
    add_shape_args(p, **(RUN_SHAPE | {"global_batch": 16, "max_bytes": 400_000}))
    add_output_args(p, "layouts")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_layout(name, args, Path(tmp)) for name in args.layouts]
    base = next((r for r in rows if r["layout"].startswith("dp1·tp1·pp1")), None)
    print(f"{'layout':<22}{'m/rank':>7}{'step s':>9}{'tokens/s':>10}{'vs 1 rank':>10}{'bubble':>9}{'1F1B':>7}")
    for r in rows:
        r["speedup_vs_single"] = base["step_s"] / r["step_s"] if base else None
        if base and r["pp"] > 1:
            m, pp = r["micro_batches_per_rank"], r["pp"]
            r["bubble_measured"] = 1 - (base["step_s"] / pp) / r["step_s"]
            r["bubble_theory"] = (pp - 1) / (m + pp - 1)
        bub = f"{r['bubble_measured']:.2f}" if "bubble_measured" in r else "-"
        theory = f"{r['bubble_theory']:.2f}" if "bubble_theory" in r else "-"
        ratio = f"{r['speedup_vs_single']:.2f}" if r["speedup_vs_single"] else "-"
        print(f"{r['name'] + ' ' + r['layout']:<22}{r['micro_batches_per_rank']:>7}{r['step_s']:>9.3f}"
              f"{r['tokens_per_s']:>10.0f}{ratio:>10}{bub:>9}{theory:>7}")
    save_result({"args": vars(args), "rows": rows}, args.out_json, args.out_png, plot)
    return 0


def plot(result: dict):
    rows = result["rows"]
    fig, (a1, a2) = subplots(1, 2, figsize=(11, 4))
    a1.bar([r["name"] for r in rows], [r["tokens_per_s"] for r in rows], color="tab:blue")
    a1.set_ylabel("tokens/s")
    a1.set_title("training throughput per layout")
    a1.tick_params(axis="x", rotation=30)
    pipes = [r for r in rows if "bubble_measured" in r]
    if pipes:
        xs = range(len(pipes))
        a2.bar([x - 0.2 for x in xs], [r["bubble_measured"] for r in pipes], width=0.4, label="measured")
        a2.bar([x + 0.2 for x in xs], [r["bubble_theory"] for r in pipes], width=0.4, label="1F1B theory")
        a2.set_xticks(list(xs), [r["name"] for r in pipes])
        a2.set_ylabel("idle share of a stage")
        a2.set_title("pipeline bubble")
        a2.legend()
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
