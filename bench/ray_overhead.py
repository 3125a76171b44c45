"""What running the trainer as Ray Train workers costs against the plain launcher (torch multiprocessing, the
torchrun-equivalent peer): the same model, layout (dp2 by default) and steps, steady-state tokens/s and time to
first step of each.

Steady state is the median wall time between consecutive metrics.jsonl lines after the warm-up steps, watched from
a thread of this process: it includes what runs around the step (Ray's per-step preemption poll, hooks), which the
trainer's own `step_time_s` (also reported) leaves out. Time to first step is the wall time from the launch call to
the first metrics.jsonl line (so it includes that first step); for Ray it is given with and without starting the
embedded local Ray (`ray.init(address="local")`, never another cluster that may run on this machine).

    python bench/ray_overhead.py --steps 40 --warmup-steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from moe_platform.config import load_config  # noqa: E402
from moe_platform.train.launch import launch_local  # noqa: E402

SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


class MetricsWatcher(threading.Thread):
    """Notes the wall time (perf_counter) at which each step's line first appears in metrics.jsonl."""

    def __init__(self, path: Path, poll_s: float = 0.02):
        super().__init__(daemon=True)
        self.path, self.poll_s = path, poll_s
        self.seen: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        size = -1
        while not self.stop.is_set():
            self.scan(size_hint=size)
            size = self.path.stat().st_size if self.path.exists() else -1
            self.stop.wait(self.poll_s)
        self.scan(size_hint=-2)

    def scan(self, size_hint: int) -> None:
        if not self.path.exists() or self.path.stat().st_size == size_hint:
            return
        now = time.perf_counter()
        for line in self.path.read_text().splitlines():
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError):
                continue  # a line being written
            self.seen.setdefault(step, now)

    def finish(self) -> dict[int, float]:
        self.stop.set()
        self.join()
        return self.seen


def overrides(args, storage: Path, name: str) -> list[str]:
    corpus = args.corpus or (str(SHAKESPEARE) if SHAKESPEARE.exists() else "")
    return [
        f"--run.name={name}", f"--run.storage_path={storage}", f"--data.path={corpus}", "--data.vocab_size=2048",
        f"--data.max_bytes={args.max_bytes}", f"--data.cache_dir={storage / 'cache'}",
        f"--model.dim={args.dim}", f"--model.n_layers={args.layers}", "--model.n_heads=4", "--model.n_kv_heads=2",
        f"--model.intermediate_size={args.intermediate}", f"--model.num_experts={args.experts}", "--model.top_k=2",
        f"--train.steps={args.steps}", f"--train.global_batch_size={args.global_batch}",
        f"--train.micro_batch_size={args.global_batch // (2 * args.dp)}", f"--train.seq_len={args.seq_len}",
        "--train.warmup=1", "--train.eval_interval=0", "--checkpoint.interval=0", "--checkpoint.export=false",
        f"--parallel.dp={args.dp}", f"--elastic.min_workers={args.dp}", f"--elastic.max_workers={args.dp}",
        "--elastic.cpus_per_worker=1", f"--failure.preemption_check_steps={args.preemption_check_steps}",
    ]


def measure(kind: str, args, storage: Path) -> dict:
    cfg = load_config(None, overrides(args, storage, kind))
    metrics = storage / kind / "metrics.jsonl"
    watcher = MetricsWatcher(metrics)
    watcher.start()
    ray_init_s = 0.0
    t0 = time.perf_counter()
    try:
        if kind == "ray":
            import ray

            from moe_platform.train.ray_launcher import launch_ray

            ray.init(address="local", num_cpus=args.dp, include_dashboard=False, logging_level="WARNING")
            ray_init_s = time.perf_counter() - t0
            try:
                launch_ray(cfg, address="local", progress=False)
            finally:
                ray.shutdown()
        else:
            launch_local(cfg, world_size=args.dp, progress=False)
    finally:
        wall = time.perf_counter() - t0
        seen = watcher.finish()
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if len(recs) < args.steps or len(seen) < args.steps:
        raise RuntimeError(f"{kind}: expected {args.steps} steps in {metrics}, found {len(recs)} (watched {len(seen)})")
    steps = sorted(seen)
    deltas = [seen[s] - seen[s - 1] for s in steps if s > args.warmup_steps + 1 and s - 1 in seen]
    step_wall_s = statistics.median(deltas)
    step_time_s = statistics.median(r["step_time_s"] for r in recs[args.warmup_steps:])
    tokens_per_step = args.global_batch * args.seq_len
    return {"launcher": kind, "wall_s": wall, "ray_init_s": ray_init_s,
            "time_to_first_step_s": seen[steps[0]] - t0,
            "time_to_first_step_after_ray_init_s": seen[steps[0]] - t0 - ray_init_s,
            "step_wall_s": step_wall_s, "step_time_s": step_time_s,
            "tokens_per_s": tokens_per_step / step_wall_s, "trainer_tokens_per_s": tokens_per_step / step_time_s,
            "step_wall_deltas_s": deltas}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of the medians")
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--max-bytes", type=int, default=300_000)
    p.add_argument("--preemption-check-steps", type=int, default=1,
                   help="failure.preemption_check_steps: steps between Ray's preemption polls (a collective each)")
    p.add_argument("--corpus", default=None)
    p.add_argument("--order", nargs="+", default=["plain", "ray"], choices=["plain", "ray"],
                   help="launchers in the order run; repeat one to alternate (medians of its repeats are shown)")
    p.add_argument("--out-json", default=str(REPO / "docs" / "bench_ray_overhead.json"))
    p.add_argument("--out-png", default=str(REPO / "docs" / "bench_ray_overhead.png"))
    args = p.parse_args(argv)
    os.environ.pop("RAY_ADDRESS", None)  # an exported address would point launch_ray at some other cluster

    load_before = os.getloadavg()
    runs = []
    for i, kind in enumerate(args.order):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append({**measure(kind, args, Path(tmp) / str(i)), "loadavg_after": os.getloadavg()})
    load_after = os.getloadavg()

    def med(kind, key):
        return statistics.median(r[key] for r in runs if r["launcher"] == kind)

    keys = ["tokens_per_s", "step_wall_s", "trainer_tokens_per_s", "time_to_first_step_s",
            "time_to_first_step_after_ray_init_s", "ray_init_s", "wall_s"]
    summary = {kind: {k: med(kind, k) for k in keys} for kind in ("plain", "ray")}
    ratio = summary["ray"]["tokens_per_s"] / summary["plain"]["tokens_per_s"]
    trainer_ratio = summary["ray"]["trainer_tokens_per_s"] / summary["plain"]["trainer_tokens_per_s"]
    print(f"dp{args.dp}, dim {args.dim}, {args.layers} layers, {args.experts} experts, {args.steps} steps, "
          f"preemption check every {args.preemption_check_steps} step(s) "
          f"(median after {args.warmup_steps}); load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"on {os.cpu_count()} CPUs")
    print(f"{'launcher':<10}{'tok/s (wall)':>14}{'tok/s (step)':>14}{'1st step s':>12}{'  excl. ray.init':>17}"
          f"{'total s':>10}")
    for kind in ("plain", "ray"):
        s = summary[kind]
        print(f"{kind:<10}{s['tokens_per_s']:>14.0f}{s['trainer_tokens_per_s']:>14.0f}"
              f"{s['time_to_first_step_s']:>12.2f}{s['time_to_first_step_after_ray_init_s']:>17.2f}{s['wall_s']:>10.1f}")
    print(f"steady-state tokens/s ratio Ray/plain: {ratio:.3f} wall-clock, {trainer_ratio:.3f} trainer step_time_s "
          f"(target >= 0.98)")
    Path(args.out_json).write_text(json.dumps({
        "args": vars(args), "loadavg_before": load_before, "loadavg_after": load_after, "cpus": os.cpu_count(),
        "summary": summary, "ratio": ratio, "trainer_ratio": trainer_ratio, "runs": runs}, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    kinds = ["plain", "ray"]
    a.bar(kinds, [summary[k]["tokens_per_s"] for k in kinds], color=["tab:gray", "tab:blue"])
    a.set_ylabel("steady-state tokens / s")
    a.set_title(f"Ray/plain = {ratio:.3f}")
    b.bar(kinds, [summary[k]["time_to_first_step_after_ray_init_s"] for k in kinds], color=["tab:gray", "tab:blue"],
          label="launch call to first step")
    b.bar(kinds, [summary[k]["ray_init_s"] for k in kinds], color="tab:orange",
          bottom=[summary[k]["time_to_first_step_after_ray_init_s"] for k in kinds], label="ray.init")
    b.set_ylabel("seconds to first step")
    b.legend(fontsize=8)
    fig.suptitle(f"dp{args.dp} on {os.cpu_count()} CPUs, preemption check every {args.preemption_check_steps} "
                 f"step(s), load avg {load_before[0]:.1f}")
    fig.tight_layout()
    fig.savefig(args.out_png, dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
