"""What running the trainer as Ray Train workers costs against the plain launcher (torch multiprocessing, the
torchrun-equivalent peer): the same model, layout (dp2 by default) and steps, steady-state tokens/s and time to
first step of each.

Steady state is the wall-clock rate between the end of the warm-up steps and the end of the last step, from the Unix
time each step's metrics.jsonl line carries: it includes everything that runs between steps (the preemption check,
Ray's hooks and metrics), which the trainer's own `step_time_s` (also reported, as a median) leaves out. Time to
first step is the wall time from the launch call to the end of the first step; for Ray it is given with and without
starting the embedded local Ray (`ray.init(address="local")`, never another cluster that may run on this machine).

A third launcher tells what of the difference is Ray itself rather than how training runs under it: the plain
ranks again, with an idle Ray instance (GCS, raylet, dashboard agent, log monitor, idle workers) started beside them
on the same cores, as a Ray Train job has.

On a small shared machine one run's throughput moves by up to ~15% from the next, for every launcher alike, so the
launchers take turns (`--rounds` times plain, Ray Train, plain beside Ray): the headline ratio is the median over
rounds of each round's own ratio (so slow drifts of the machine cancel), shown with its spread; the table gives each
launcher's medians.

With `--pin` the run takes the shape of a GPU node, where training ranks have their own host cores and everything
else runs on others: each rank is pinned to its own cores (`elastic.rank_cpus`), and the driver, Ray's daemons, Ray
Train's controller and actors and the plain launcher's parent process to the `--host-cpus`, for all three launchers.
Its figures go under "pinned" in the same JSON (the unpinned figures stay beside them), plotted to
bench_ray_overhead_pinned.png.

    python bench/ray_overhead.py --steps 60 --warmup-steps 10
    python bench/ray_overhead.py --pin --dp 1           # two cores: host processes on core 0, the rank on core 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO / "bench"))

from _output import add_output_args, save_result, subplots  # noqa: E402
from _training import RUN_SHAPE, add_shape_args, run_overrides  # noqa: E402
from moe_platform.config import load_config  # noqa: E402
from moe_platform.train.launch import launch_local, pin_process  # noqa: E402
from moe_platform.train.metrics import MetricsLog  # noqa: E402

KINDS = ["plain", "ray", "beside_ray"]
LABELS = {"plain": "plain processes", "ray": "Ray Train", "beside_ray": "plain processes, idle Ray beside"}
SHORT = {"plain": "plain", "ray": "Ray Train", "beside_ray": "plain + idle Ray"}


def overrides(args, storage: Path, name: str) -> list[str]:
    return run_overrides(args, storage, name, args.global_batch // (2 * args.dp), **{
        "parallel.dp": args.dp, "elastic.min_workers": args.dp, "elastic.max_workers": args.dp,
        "elastic.cpus_per_worker": 1, "failure.preemption_check_steps": args.preemption_check_steps,
        "elastic.rank_cpus": args.rank_cpus})


def split_cores(host: str, dp: int) -> tuple[list[int], str]:
    """The host cores (from a list like "0" or "0-1") and `elastic.rank_cpus` giving each of `dp` ranks an equal
    share of the other cores this process may use."""
    from moe_platform.config import rank_cpu_sets

    hosts = rank_cpu_sets(host)[0] if host.strip() else []
    free = [c for c in sorted(os.sched_getaffinity(0)) if c not in hosts]
    if not hosts or len(free) < dp:
        raise SystemExit(f"--pin: {len(free)} core(s) left after the host cores {hosts} for {dp} rank(s); lower "
                         f"--dp or --host-cpus")
    per = len(free) // dp
    return hosts, ";".join(",".join(map(str, free[i * per:(i + 1) * per])) for i in range(dp))


def measure(kind: str, args, storage: Path) -> dict:
    cfg = load_config(None, overrides(args, storage, kind))
    metrics = storage / kind / "metrics.jsonl"
    ray_init_s = 0.0
    t0 = time.time()
    if kind == "plain":
        launch_local(cfg, world_size=args.dp, progress=False)
    else:
        import ray

        from moe_platform.train.ray_launcher import launch_ray

        ray.init(address="local", num_cpus=args.dp, include_dashboard=False, logging_level="WARNING")
        ray_init_s = time.time() - t0
        try:
            if kind == "ray":
                launch_ray(cfg, address="local", progress=False)
            else:  # "beside_ray": the plain ranks, with an idle Ray instance (its daemons) on the same cores
                launch_local(cfg, world_size=args.dp, progress=False)
        finally:
            ray.shutdown()
    wall = time.time() - t0
    recs = sorted(MetricsLog(metrics).read(), key=lambda r: r["step"])
    if [r["step"] for r in recs] != list(range(1, args.steps + 1)):
        raise RuntimeError(f"{kind}: expected steps 1..{args.steps} once each in {metrics}")
    first, last = recs[args.warmup_steps - 1], recs[-1]  # the rate over steps warmup+1 .. steps
    step_wall_s = (last["time"] - first["time"]) / (last["step"] - first["step"])
    step_time_s = statistics.median(r["step_time_s"] for r in recs[args.warmup_steps:])
    tokens_per_step = args.global_batch * args.seq_len
    return {"launcher": kind, "wall_s": wall, "ray_init_s": ray_init_s,
            "time_to_first_step_s": recs[0]["time"] - t0,
            "time_to_first_step_after_ray_init_s": recs[0]["time"] - t0 - ray_init_s,
            "step_wall_s": step_wall_s, "step_time_s": step_time_s,
            "tokens_per_s": tokens_per_step / step_wall_s, "trainer_tokens_per_s": tokens_per_step / step_time_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup-steps", type=int, default=10, help="first steps left out of the steady state")
    p.add_argument("--dp", type=int, default=2)
    add_shape_args(p, **RUN_SHAPE)
    p.add_argument("--preemption-check-steps", type=int, default=1,
                   help="failure.preemption_check_steps: steps between preemption checks (an all-reduce each)")
    p.add_argument("--rounds", type=int, default=4, help="runs of each launcher, taking turns: plain, Ray Train, "
                                                         "plain beside an idle Ray")
    add_output_args(p, "ray_overhead")
    p.add_argument("--pin", action="store_true", help="the GPU-node shape: ranks pinned to their own cores, "
                                                      "everything else to --host-cpus")
    p.add_argument("--host-cpus", default="0", help="with --pin: the cores of the driver, Ray and the launcher")
    args = p.parse_args(argv)
    os.environ.pop("RAY_ADDRESS", None)  # an exported address would point launch_ray at some other cluster
    args.rank_cpus = ""
    if args.pin:
        args.host_list, args.rank_cpus = split_cores(args.host_cpus, args.dp)
        pin_process(args.host_list)  # Ray's daemons and workers and the plain launcher's children start from here

    result = run_rounds(args)
    if args.pin:  # under "pinned", the unpinned figures staying from their own run
        png = Path(args.out_png).with_name(Path(args.out_png).stem + "_pinned.png")
        save_result(result, args.out_json, png, plot, merge_key="pinned")
    else:  # the pinned figures stay, from their own run
        save_result(result, args.out_json, args.out_png, plot, keep=("pinned",))
    return 0


def run_rounds(args) -> dict:
    load_before = os.getloadavg()
    runs = []
    for i, kind in enumerate(KINDS * args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append({**measure(kind, args, Path(tmp) / str(i)), "loadavg_after": os.getloadavg()})
        if args.pin:  # a one-rank plain run trains in this process, pinned to the rank's cores: move back
            pin_process(args.host_list)
    load_after = os.getloadavg()

    def med(kind, key):
        return statistics.median(r[key] for r in runs if r["launcher"] == kind)

    def round_ratios(kind: str, peer: str) -> list[float]:
        """kind's tokens/s over peer's in each round (the runs of one round follow each other)."""
        by_round = [runs[i:i + len(KINDS)] for i in range(0, len(runs), len(KINDS))]
        return [next(r for r in rnd if r["launcher"] == kind)["tokens_per_s"]
                / next(r for r in rnd if r["launcher"] == peer)["tokens_per_s"] for rnd in by_round]

    keys = ["tokens_per_s", "step_wall_s", "trainer_tokens_per_s", "time_to_first_step_s",
            "time_to_first_step_after_ray_init_s", "ray_init_s", "wall_s"]
    summary = {kind: {k: med(kind, k) for k in keys} for kind in KINDS}
    ratios = {"ray/plain": round_ratios("ray", "plain"), "beside_ray/plain": round_ratios("beside_ray", "plain"),
              "ray/beside_ray": round_ratios("ray", "beside_ray")}
    ratio = statistics.median(ratios["ray/plain"])
    trainer_ratio = summary["ray"]["trainer_tokens_per_s"] / summary["plain"]["trainer_tokens_per_s"]
    shape = (f", ranks pinned to cores {args.rank_cpus}, everything else to {args.host_cpus}" if args.pin else "")
    print(f"dp{args.dp}, dim {args.dim}, {args.layers} layers, {args.experts} experts, {args.steps} steps, "
          f"preemption check every {args.preemption_check_steps} step(s) "
          f"(steady state after {args.warmup_steps}), {args.rounds} rounds{shape}; load average before "
          f"{load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'launcher':<34}{'tok/s (wall)':>14}{'tok/s (step)':>14}{'1st step s':>12}{'  excl. ray.init':>17}"
          f"{'total s':>10}   runs, tok/s (wall)")
    for kind in KINDS:
        s = summary[kind]
        each = [round(r["tokens_per_s"]) for r in runs if r["launcher"] == kind]
        print(f"{LABELS[kind]:<34}{s['tokens_per_s']:>14.0f}{s['trainer_tokens_per_s']:>14.0f}"
              f"{s['time_to_first_step_s']:>12.2f}{s['time_to_first_step_after_ray_init_s']:>17.2f}"
              f"{s['wall_s']:>10.1f}   {each}")
    for name, values in ratios.items():
        print(f"  {name}: median {statistics.median(values):.3f} of rounds {[round(v, 3) for v in values]}")
    print(f"steady-state tokens/s ratio Ray/plain: {ratio:.3f} wall-clock (target >= 0.98), {trainer_ratio:.3f} on "
          f"the medians of the trainer's step_time_s")
    return {"args": vars(args), "loadavg_before": load_before, "loadavg_after": load_after, "cpus": os.cpu_count(),
            "summary": summary, "ratio": ratio, "round_ratios": ratios, "trainer_ratio": trainer_ratio, "runs": runs}


def plot(result: dict):
    summary, runs, ratio, ratios = result["summary"], result["runs"], result["ratio"], result["round_ratios"]
    args = result["args"]
    fig, (a, b) = subplots(1, 2, figsize=(10, 3.8))
    colors = {"plain": "tab:gray", "ray": "tab:blue", "beside_ray": "tab:olive"}
    names = [SHORT[k] for k in KINDS]
    a.bar(names, [summary[k]["tokens_per_s"] for k in KINDS], color=[colors[k] for k in KINDS], alpha=0.6,
          label="median")
    for i, k in enumerate(KINDS):
        each = [r["tokens_per_s"] for r in runs if r["launcher"] == k]
        a.scatter([i] * len(each), each, color="black", s=12, zorder=3, label="one run" if i == 0 else None)
    a.set_ylabel("steady-state tokens / s")
    a.set_title(f"Ray/plain = {ratio:.3f} (rounds {min(ratios['ray/plain']):.2f}..{max(ratios['ray/plain']):.2f})")
    a.legend(fontsize=8, loc="lower right")
    b.bar(names, [summary[k]["time_to_first_step_after_ray_init_s"] for k in KINDS],
          color=[colors[k] for k in KINDS], label="launch call to first step")
    b.bar(names, [summary[k]["ray_init_s"] for k in KINDS], color="tab:orange",
          bottom=[summary[k]["time_to_first_step_after_ray_init_s"] for k in KINDS], label="ray.init")
    b.set_ylabel("seconds to first step")
    b.legend(fontsize=8)
    shape = f", ranks on cores {args['rank_cpus']}, Ray and launcher on {args['host_cpus']}" if args.get("pin") else ""
    fig.suptitle(f"dp{args['dp']} on {os.cpu_count()} CPUs{shape}, preemption check every "
                 f"{args['preemption_check_steps']} step(s), load avg {result['loadavg_before'][0]:.1f}")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
