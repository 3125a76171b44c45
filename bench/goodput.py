"""Goodput under preemptions, on either launcher.

--launcher ray: under Ray Train on a real multi-node Ray on this machine, with reclaim notices through the spot agent
and with hard kills; see bench/_goodput_ray.py. Recorded under "ray" in the JSON, plotted to bench_goodput_ray.png.

    python bench/goodput.py --launcher ray --steps 200 --interrupt-every 20 --checkpoint-interval 20

--launcher local (the default): on the plain launcher, the same N-step training run once uninterrupted
(the baseline) and once with the whole job SIGKILLed every T seconds and relaunched until it reaches N steps
(resume from the latest committed checkpoint is automatic). Goodput = baseline wall time / interrupted wall time.

The run also measures what one preemption costs: the restart (relaunch to the first new step, less one step) plus
the steps lost since the last committed checkpoint. One preemption every P seconds then leaves
    goodput(P) = 1 - cost_per_preemption / P,
given for P = 600 s (one preemption per 10 minutes) with the inputs shown.

    python bench/goodput.py --steps 120 --interrupt-every 30 --checkpoint-interval 10
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO / "bench"))

from _output import add_output_args, save_result, subplots  # noqa: E402
from _training import RUN_SHAPE, add_shape_args, run_overrides  # noqa: E402
from moe_platform.checkpoint import checkpoint_step  # noqa: E402
from moe_platform.checkpoint.store import latest_checkpoint  # noqa: E402


def read_steps(path: Path) -> tuple[list[int], int]:
    """Steps in metrics.jsonl, and how many lines did not parse (a line cut by the kill)."""
    steps, bad = [], 0
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except (ValueError, KeyError):
                bad += 1
    return steps, bad


def truncate_metrics(path: Path, step: int) -> int:
    """What the trainer does on resume (drop lines after the checkpoint), done before the launch so that the watcher
    sees only this attempt's steps; also drops a line cut by the kill. Returns the lines that did not parse."""
    if not path.exists():
        return 0
    kept, bad = [], 0
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError):
            bad += 1
    path.write_text("".join(line + "\n" for line in kept))
    return bad


def watch(path: Path, seen: dict[int, float], stop: threading.Event, poll_s: float = 0.02) -> None:
    while not stop.wait(poll_s):
        now = time.perf_counter()
        for s in read_steps(path)[0]:
            seen.setdefault(s, now)


def run_attempt(overrides: list[str], run_dir: Path, kill_after: float | None) -> dict:
    """One launch of the whole job (all ranks) in its own process group; SIGKILLed after `kill_after` seconds."""
    ckpt = latest_checkpoint(run_dir) if run_dir.exists() else None
    start_step = checkpoint_step(ckpt) if ckpt is not None else 0
    metrics = run_dir / "metrics.jsonl"
    cut_lines = truncate_metrics(metrics, start_step)
    seen: dict[int, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(metrics, seen, stop), daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would stall the ranks
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(overrides)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=log, text=True)
    killed = False
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank at once, like a reclaimed node
        killed = True
        proc.wait()
    wall = time.perf_counter() - t0
    stop.set()
    watcher.join()
    log.seek(0)
    stderr = log.read()
    log.close()
    if not killed and proc.returncode != 0:
        raise RuntimeError(f"training exited with {proc.returncode}:\n{stderr[-3000:]}")
    new = sorted(s for s in seen if s > start_step)
    return {"start_step": start_step, "killed": killed, "wall_s": wall, "cut_lines": cut_lines,
            "last_step": new[-1] if new else start_step,
            "first_step_s": seen[new[0]] - t0 if new else None,
            "step_times": {s: seen[s] - t0 for s in new}}


def overrides_for(args, storage: Path) -> list[str]:
    return run_overrides(args, storage, "goodput", args.global_batch // (2 * args.dp), **{
        "checkpoint.interval": args.checkpoint_interval, "checkpoint.keep": 2, "parallel.dp": args.dp})


def child(overrides_json: str) -> int:
    from moe_platform.config import load_config
    from moe_platform.train.launch import launch_local

    cfg = load_config(None, json.loads(overrides_json))
    launch_local(cfg, world_size=cfg.parallel.dp, progress=False)
    return 0


def step_wall(attempts: list[dict]) -> float:
    deltas = []
    for a in attempts:
        t = a["step_times"]
        deltas += [t[s] - t[s - 1] for s in t if s - 1 in t]
    return statistics.median(deltas)


def ray_overrides(args, storage: Path) -> list[str]:
    return run_overrides(args, storage, "goodput", args.global_batch, **{
        "checkpoint.interval": args.checkpoint_interval, "checkpoint.keep": 2, "parallel.dp": 1,
        "failure.max_failures": 20, "failure.preemption_grace_s": 5})


def main_ray(args) -> int:
    import _goodput_ray

    result = _goodput_ray.measure(args, ray_overrides)
    for mode, s in result["summary"].items():
        print(f"{mode}: goodput {s['goodput']:.3f} over {s['preemptions']} preemptions, "
              f"{s['lost_steps_per_preemption']:.1f} lost steps and {s['cost_per_preemption_s']:.1f} s per preemption")
    ratio, at = result["notice_cost_vs_kill"], result["goodput_at_period"]
    print(f"measured on each run's own resumes: notice/kill cost = {result['notice_gap_vs_kill']:.2f}")
    print(f"notice cost / kill cost = {ratio:.2f} (target <= 0.6); goodput at one preemption per "
          f"{args.period / 60:.0f} min: notice {at['notice']:.3f} (target >= 0.97), kill {at['kill']:.3f}")
    # under "ray" in the local launcher's JSON, its figures staying from their own run
    save_result(result, args.out_json, Path(args.out_png).with_name("bench_goodput_ray.png"), _goodput_ray.plot,
                merge_key="ray")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=300, help="N: steps of the run")
    p.add_argument("--interrupt-every", type=float, default=20.0, help="T: seconds each launch lives before SIGKILL")
    p.add_argument("--checkpoint-interval", type=int, default=10)
    p.add_argument("--period", type=float, default=600.0, help="P: seconds between preemptions to extrapolate to")
    p.add_argument("--max-attempts", type=int, default=30)
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--launcher", choices=("local", "ray"), default="local",
                   help="local: SIGKILL the whole job; ray: Ray Train with notices and hard kills (one worker, "
                        "two spot nodes: one holds it, one stands by)")
    p.add_argument("--health-checks", choices=("ray-default", "fast"), default="ray-default",
                   help="ray: how fast the GCS notices a vanished node: Ray's defaults (about 15 s), or the tests' "
                        "1 s x 3")
    p.add_argument("--notice-deadline", type=float, default=10.0,
                   help="ray: seconds between a reclaim notice and the node vanishing (AWS gives 120)")
    add_shape_args(p, **RUN_SHAPE)
    add_output_args(p, "goodput")
    args = p.parse_args(argv)
    if args.child is not None:
        return child(args.child)
    if args.launcher == "ray":
        return main_ray(args)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        base_storage, int_storage = Path(tmp) / "baseline", Path(tmp) / "interrupted"
        baseline = run_attempt(overrides_for(args, base_storage), base_storage / "goodput", None)
        load_mid = os.getloadavg()
        attempts = []
        while not attempts or attempts[-1]["killed"]:
            if len(attempts) >= args.max_attempts:
                raise RuntimeError(f"not finished after {args.max_attempts} launches; raise --interrupt-every")
            attempts.append(run_attempt(overrides_for(args, int_storage), int_storage / "goodput",
                                        args.interrupt_every))
            a = attempts[-1]
            print(f"launch {len(attempts)}: from step {a['start_step']} to {a['last_step']} in {a['wall_s']:.1f} s"
                  f"{' (killed)' if a['killed'] else ''}", flush=True)
    load_after = os.getloadavg()

    total_s = sum(a["wall_s"] for a in attempts)
    n_pre = sum(a["killed"] for a in attempts)
    goodput_measured = baseline["wall_s"] / total_s
    step_s = step_wall([baseline])
    restarts = [a["first_step_s"] - step_s for a in attempts[1:] if a["first_step_s"] is not None]
    restart_s = statistics.median(restarts) if restarts else float("nan")
    lost = [a["last_step"] - b["start_step"] for a, b in zip(attempts, attempts[1:], strict=False) if a["killed"]]
    lost_steps = statistics.mean(lost) if lost else 0.0
    cost_parts = restart_s + lost_steps * step_s
    cost_total = (total_s - baseline["wall_s"]) / n_pre if n_pre else 0.0
    cost = max(cost_parts, cost_total)  # the larger of the two estimates, so the extrapolation is not flattering
    goodput_p = 1 - cost / args.period
    expected_lost = args.checkpoint_interval / 2  # a preemption at a random time loses half an interval on average
    goodput_p_random = 1 - (restart_s + expected_lost * step_s) / args.period

    print(f"dp{args.dp}, dim {args.dim}, {args.layers} layers, {args.experts} experts, N={args.steps} steps, "
          f"SIGKILL every T={args.interrupt_every:.0f} s, checkpoint every {args.checkpoint_interval} steps; "
          f"load average {load_before[0]:.2f} / {load_mid[0]:.2f} / {load_after[0]:.2f} (start/mid/end) "
          f"on {os.cpu_count()} CPUs")
    print(f"{'run':<14}{'launches':>9}{'wall s':>9}{'steps/s':>9}{'goodput':>9}")
    print(f"{'baseline':<14}{1:>9}{baseline['wall_s']:>9.1f}{args.steps / baseline['wall_s']:>9.3f}{1.0:>9.3f}")
    print(f"{'interrupted':<14}{len(attempts):>9}{total_s:>9.1f}{args.steps / total_s:>9.3f}{goodput_measured:>9.3f}")
    print(f"measured per preemption ({n_pre}): restart {restart_s:.1f} s (median relaunch to first new step, less one "
          f"step), lost {lost_steps:.1f} steps x {step_s:.2f} s = {cost_parts:.1f} s; "
          f"from the totals (interrupted - baseline) / {n_pre} = {cost_total:.1f} s")
    print(f"goodput(P={args.period:.0f} s) = 1 - cost / P = 1 - {cost:.1f} / {args.period:.0f} = {goodput_p:.3f} "
          f"(target >= 0.95); with half an interval lost on average: {goodput_p_random:.3f}")

    result = {
        "args": vars(args), "cpus": os.cpu_count(),
        "loadavg": {"start": load_before, "after_baseline": load_mid, "end": load_after},
        "baseline": baseline, "attempts": attempts, "total_interrupted_s": total_s, "preemptions": n_pre,
        "goodput_measured": goodput_measured, "step_wall_s": step_s, "restart_s": restart_s, "restarts_s": restarts,
        "lost_steps": lost, "cost_from_parts_s": cost_parts, "cost_from_totals_s": cost_total,
        "cost_per_preemption_s": cost, "formula": "goodput(P) = 1 - cost_per_preemption_s / P",
        "period_s": args.period, "goodput_at_period": goodput_p, "goodput_at_period_half_interval_lost":
            goodput_p_random, "cut_metrics_lines": sum(a["cut_lines"] for a in attempts)}
    save_result(result, args.out_json, args.out_png, plot, keep=("ray",))  # "ray": the other launcher's, its own run
    return 0


def plot(result: dict):
    args = result["args"]
    fig, ax = subplots(figsize=(7, 3.8))
    bt = result["baseline"]["step_times"]
    ax.plot(list(bt.values()), list(bt), color="tab:gray", label="uninterrupted")
    offset = 0.0
    for i, a in enumerate(result["attempts"]):
        t = a["step_times"]
        ax.plot([offset + v for v in t.values()], list(t), color="tab:red",
                label="SIGKILL every T s" if i == 0 else None)
        offset += a["wall_s"]
        if a["killed"]:
            ax.axvline(offset, color="tab:red", alpha=0.3, lw=0.8)
    ax.set_xlabel("wall seconds")
    ax.set_ylabel("training step reached")
    ax.set_title(f"goodput {result['goodput_measured']:.2f} at T={args['interrupt_every']:.0f} s; "
                 f"extrapolated {result['goodput_at_period']:.3f} at one preemption / {args['period'] / 60:.0f} min")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
