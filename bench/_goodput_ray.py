"""`bench/goodput.py --launcher ray`: goodput measured under Ray Train itself, on a real multi-node Ray on this
machine (ray.cluster_utils.Cluster: a head with no CPU and one spot worker node with the training worker).

Three runs of the same N steps, each on a fresh cluster:
- baseline: no preemption;
- notice: every T seconds of training, the cloud publishes a spot terminate notice (AWS IMDSv2, real HTTP on
  loopback) with a deadline D seconds ahead; the node's spot agent (`moe-platform spot-agent`) drains the node;
  the worker writes a just-in-time checkpoint and waits; at the deadline the node vanishes and a fresh node joins
  (what the autoscaler does), where Ray Train restarts the worker at deadline + failure.preemption_grace_s;
- kill: every T seconds the node vanishes with no notice (hard kill) and a fresh node joins; Ray Train restarts the
  worker, which resumes from the latest periodic checkpoint.
Goodput = baseline wall time / the run's wall time. Lost steps per preemption come from the trainer's resume events
(steps logged after the checkpoint it resumed from, computed again)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the multi-node cluster and the metadata server the tests use

from tinyrun import (  # noqa: E402
    FakeCloud,
    free_port,
    last_logged_step,
    node_cluster,
    poll,
    run_events,
    start_in_background,
)


def _preempt(mode: str, cluster, cloud, run_dir: Path, every_s: float, deadline_s: float, steps: int,
             running, log: dict) -> None:
    """Every `every_s` seconds of training, reclaim the worker node (with or without notice) and add a fresh one,
    while `running()`. Records when and at which step each preemption came. On the main thread: Ray's
    Cluster.add_node installs signal handlers."""
    node = next(iter(cluster.worker_nodes))
    agent = cloud.start_agent(cluster.address, node.node_id) if mode == "notice" else None
    try:
        while running():
            start = last_logged_step(run_dir)
            poll(lambda s=start: last_logged_step(run_dir) > s or not running(), 600, "training to (re)start")
            end = time.monotonic() + every_s
            poll(lambda e=end: time.monotonic() > e or not running(), every_s + 1, "the next preemption")
            if not running() or last_logged_step(run_dir) >= steps - 5:
                break
            event = {"at_step": last_logged_step(run_dir), "t": time.monotonic()}
            if mode == "notice":
                deadline = cloud.publish_aws_terminate(deadline_s)
                out, err = agent.communicate(timeout=60)
                if agent.returncode != 0:
                    raise RuntimeError(f"the spot agent failed: {err[-2000:]}")
                poll(lambda d=deadline: time.monotonic() > d, deadline_s + 5, "the deadline")
            cluster.remove_node(node, allow_graceful=False)
            cloud.state["aws_action"] = None  # the next VM has no notice yet
            node = cluster.add_node(num_cpus=1, dashboard_agent_listen_port=free_port())  # the old one may linger
            cluster.wait_for_nodes()
            agent = cloud.start_agent(cluster.address, node.node_id) if mode == "notice" else None
            log["preemptions"].append(event)
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()


def run_once(mode: str, overrides: list[str], storage: Path, every_s: float, deadline_s: float) -> dict:
    from moe_platform.config import load_config
    from moe_platform.train.ray_launcher import launch_ray

    cfg = load_config(None, overrides)
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    log: dict = {"mode": mode, "preemptions": []}
    with node_cluster(head_cpus=0, worker_cpus=1) as cluster, FakeCloud() as cloud:
        t0 = time.monotonic()
        thread, out = start_in_background(lambda: launch_ray(cfg, progress=False))
        if mode != "baseline":
            _preempt(mode, cluster, cloud, run_dir, every_s, deadline_s, cfg.train.steps, thread.is_alive, log)
        thread.join()
        wall = time.monotonic() - t0
    if "error" in out:
        raise RuntimeError(f"{mode}: training failed") from out["error"]
    result = out["result"]
    events = run_events(run_dir)
    resumes = [e for e in events if e["event"] == "resume"]
    log.update(wall_s=wall, final_step=result["final_step"], resumes=len(resumes),
               lost_steps=[int(e.get("lost_steps", 0)) for e in resumes],
               preempted_events=sum(1 for e in events if e["event"] == "preempted"))
    if result["final_step"] != cfg.train.steps:
        raise RuntimeError(f"{mode}: the run ended at step {result['final_step']}, not {cfg.train.steps}")
    return log


def measure(args, overrides_for) -> dict:
    # Ray Train's drain watcher polls every 5 s by default; a notice of D seconds needs it sooner. Everything else is
    # Ray's default (a worker starting on a fresh node takes longer than the tests' shortened group-start timeout).
    os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("baseline", "notice", "kill"):
            storage = Path(tmp) / mode
            runs[mode] = run_once(mode, overrides_for(args, storage), storage, args.interrupt_every,
                                  args.notice_deadline)
            r = runs[mode]
            print(f"{mode}: {r['wall_s']:.1f} s, {len(r['preemptions'])} preemptions, lost steps {r['lost_steps']}",
                  flush=True)
    base = runs["baseline"]["wall_s"]
    summary = {}
    for mode in ("notice", "kill"):
        r = runs[mode]
        n = len(r["preemptions"])
        summary[mode] = {"preemptions": n, "goodput": base / r["wall_s"],
                         "lost_steps_per_preemption": sum(r["lost_steps"]) / n if n else 0.0,
                         "cost_per_preemption_s": (r["wall_s"] - base) / n if n else 0.0}
    return {"args": {k: v for k, v in vars(args).items() if k != "child"}, "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(), "runs": runs, "summary": summary,
            "env": {"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"]}}


def plot(result: dict, out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    modes = ["baseline", "notice", "kill"]
    walls = [result["runs"][m]["wall_s"] for m in modes]
    labels = ["no preemption", "reclaim notice\n(spot agent drains)", "hard kill\n(no notice)"]
    bars = ax.bar(labels, walls, color=["tab:gray", "tab:green", "tab:red"])
    for bar, m in zip(bars, modes, strict=True):
        s = result["summary"].get(m)
        text = ("goodput 1.00" if s is None else
                f"goodput {s['goodput']:.2f}\nlost/preemption {s['lost_steps_per_preemption']:.1f}")
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), text, ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("wall seconds for the same steps")
    ax.set_title(f"Ray Train, preemption every {result['args']['interrupt_every']:.0f} s of training")
    ax.set_ylim(0, max(walls) * 1.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
