"""`bench/goodput.py --launcher ray`: goodput measured under Ray Train itself, on a real multi-node Ray on this
machine (ray.cluster_utils.Cluster: a head with no CPU and two spot worker nodes of one CPU each; the one-worker run
uses one of them, the other stands by, as in a pool of spot VMs with one to spare).

Three runs of the same N steps, each on a fresh cluster:
- baseline: no preemption;
- notice: every T seconds of training, the cloud publishes a spot terminate notice (AWS IMDSv2, real HTTP on
  loopback; each VM has its own metadata server) for the node that holds the worker, D seconds ahead; that node's
  spot agent (`moe-platform spot-agent`) drains it; the worker writes a just-in-time checkpoint, and Ray Train
  restarts it right away on the node that stays (a draining node takes no new workers); at the deadline the drained
  node vanishes and a fresh one joins (what the autoscaler does);
- kill: every T seconds the node that holds the worker vanishes with no notice and a fresh node joins; Ray Train
  restarts the worker on the node that stays, which resumes from the latest periodic checkpoint.
Goodput = baseline wall time / the run's wall time. Lost steps per preemption come from the trainer's resume events
(steps logged after the checkpoint it resumed from, computed again)."""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the multi-node cluster and the metadata server the tests use

from _output import subplots  # noqa: E402
from tinyrun import (  # noqa: E402
    FakeCloud,
    free_port,
    last_logged_step,
    node_cluster,
    poll,
    run_events,
    start_in_background,
)


def _training_node(cluster):
    """The worker node that holds the training worker: where Ray Train's live placement group is (public API)."""
    from ray.util import placement_group_table

    held = {node for pg in placement_group_table().values() if pg["state"] == "CREATED"
            for node in pg["bundles_to_node_id"].values()}
    return next((n for n in cluster.worker_nodes if n.node_id in held), None)


def _median_step(run_dir: Path) -> float:
    times = [json.loads(line)["time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return statistics.median(b - a for a, b in zip(times, times[1:], strict=False))


def _add_spot_node(cluster):
    node = cluster.add_node(num_cpus=1, dashboard_agent_listen_port=free_port())
    cluster.wait_for_nodes()
    return node


def _preempt(mode: str, cluster, run_dir: Path, every_s: float, deadline_s: float, steps: int, running,
             log: dict) -> None:
    """Every `every_s` seconds of training, reclaim the node that holds the worker (with or without notice) and add
    a fresh one, while `running()`. Records when and at which step each preemption came. On the main thread: Ray's
    Cluster.add_node installs signal handlers."""
    watched: dict[str, tuple] = {}  # node id -> (its metadata server, its spot agent)

    def watch(node) -> None:
        if mode == "notice":
            cloud = FakeCloud()
            watched[node.node_id] = (cloud, cloud.start_agent(cluster.address, node.node_id))

    for node in cluster.worker_nodes:
        watch(node)
    try:
        while running():
            start = last_logged_step(run_dir)
            poll(lambda s=start: last_logged_step(run_dir) > s or not running(), 600, "training to (re)start")
            end = time.monotonic() + every_s
            poll(lambda e=end: time.monotonic() > e or not running(), every_s + 1, "the next preemption")
            if not running() or last_logged_step(run_dir) >= steps - 5:
                break
            node = poll(lambda: _training_node(cluster) or not running(), 60, "the training worker's node")
            if node is True:
                break
            event = {"at_step": last_logged_step(run_dir), "t": time.monotonic()}
            if mode == "notice":
                cloud, agent = watched.pop(node.node_id)
                deadline = cloud.publish_aws_terminate(deadline_s)
                out, err = agent.communicate(timeout=60)
                if agent.returncode != 0:
                    raise RuntimeError(f"the spot agent failed: {err[-2000:]}")
                poll(lambda d=deadline: time.monotonic() > d, deadline_s + 5, "the deadline")
                event["resumed_before_deadline"] = last_logged_step(run_dir) > event["at_step"]
                cloud.close()
            cluster.remove_node(node, allow_graceful=False)
            watch(_add_spot_node(cluster))  # the old one may linger
            log["preemptions"].append(event)
    finally:
        for cloud, agent in watched.values():
            if agent.poll() is None:
                agent.kill()
            cloud.close()


def _resume_gaps(run_dir: Path, resumes: list[dict]) -> list[float]:
    """Per resume at step s: the time from step s to step s + 1 in the run's final metrics. A resume keeps the
    lines up to its checkpoint, so this is all a preemption cost beyond one step: for a notice the just-in-time
    checkpoint and the restart, for a kill the steps done after the checkpoint, noticing the node's death and the
    restart."""
    times = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            times[rec["step"]] = rec["time"]
    return [times[e["step"] + 1] - times[e["step"]] for e in resumes if e["step"] in times and e["step"] + 1 in times]


def run_once(mode: str, overrides: list[str], storage: Path, every_s: float, deadline_s: float,
             fast_health_checks: bool) -> dict:
    from moe_platform.config import load_config
    from moe_platform.train.ray_launcher import launch_ray

    cfg = load_config(None, overrides)
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    log: dict = {"mode": mode, "preemptions": []}
    with node_cluster(head_cpus=0, worker_cpus=1, fast_health_checks=fast_health_checks) as cluster:
        _add_spot_node(cluster)  # the one to spare (in the baseline too: the same cluster in every run)
        t0 = time.monotonic()
        thread, out = start_in_background(lambda: launch_ray(cfg, progress=False))
        if mode != "baseline":
            _preempt(mode, cluster, run_dir, every_s, deadline_s, cfg.train.steps, thread.is_alive, log)
        thread.join()
        wall = time.monotonic() - t0
    if "error" in out:
        raise RuntimeError(f"{mode}: training failed") from out["error"]
    result = out["result"]
    events = run_events(run_dir)
    resumes = [e for e in events if e["event"] == "resume"]
    log.update(wall_s=wall, final_step=result["final_step"], resumes=len(resumes),
               lost_steps=[int(e.get("lost_steps", 0)) for e in resumes],
               resume_gaps_s=_resume_gaps(run_dir, resumes), step_s=_median_step(run_dir),
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
                                  args.notice_deadline, args.health_checks == "fast")
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
                         "cost_per_preemption_s": (r["wall_s"] - base) / n if n else 0.0,
                         # measured on the run itself, whatever the baseline's noise: each resume's gap less a step
                         "gap_cost_per_preemption_s": (statistics.mean(r["resume_gaps_s"]) - r["step_s"]
                                                       if r["resume_gaps_s"] else 0.0)}
    notice_cost, kill_cost = summary["notice"]["cost_per_preemption_s"], summary["kill"]["cost_per_preemption_s"]
    notice_gap, kill_gap = (summary[m]["gap_cost_per_preemption_s"] for m in ("notice", "kill"))
    return {"args": {k: v for k, v in vars(args).items() if k != "child"}, "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(), "runs": runs, "summary": summary,
            # the targets: a notice costs <= 0.6x a kill, and goodput >= 0.97 at one notice per period (arithmetic)
            "notice_cost_vs_kill": notice_cost / kill_cost if kill_cost > 0 else None,
            "notice_gap_vs_kill": notice_gap / kill_gap if kill_gap > 0 else None,
            "goodput_at_period": {"notice": 1 - notice_cost / args.period, "kill": 1 - kill_cost / args.period},
            "env": {"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"]},
            "health_checks": args.health_checks}


def plot(result: dict):
    fig, ax = subplots(figsize=(7, 3.6))
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
    return fig
