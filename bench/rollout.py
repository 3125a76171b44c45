"""Blue-green switch latency: our rollout switch against Ray Serve redeploying the app with the new model, same run.

A tiny MoE (dim 64, 2 layers, 8 experts top-2) in two versions with different weights serves a closed-loop load of
`--clients` clients sending 16-token completions to one replica over HTTP. Then the model changes, `--switches`
times each way, back and forth:

1. ours: `POST /admin/rollout {"action": "start", "to": OTHER, "blue_green": true}` - both versions are loaded in
   the replica; traffic moves at a request boundary once the new one reports healthy;
2. peer: `serve.run` of the same app built on the other model (what a Ray Serve user does today): Serve starts a
   replica of the new app and retires the old one once it is up.

A switch's window runs from the call to the last request that started on the old version. The requests in flight
across it overlap it; its aftermath is the `--after-s` seconds after it, while the new version warms up. The added
latency is the p99 of those requests minus the steady p99 (requests that ran and ended in the `--steady-s` before
the call); the figure in flight across the window alone is reported too. Failed requests are counted. The ratio
printed is ours ÷ peer on the added p99; the target is ours < 50 ms on both figures, with no failed request.

    python bench/rollout.py                    # ~4 minutes on 2 CPU cores
    python bench/rollout.py --switches 2       # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _output import add_output_args, save_result, subplots  # noqa: E402

MODEL = "moe-platform"
ADMIN = "bench-admin"
TARGET_MS = 50.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--switches", type=int, default=4, help="switches per system and direction")
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--steady-s", type=float, default=3.0, help="steady load before each switch (seconds)")
    p.add_argument("--after-s", type=float, default=2.0, help="seconds after a switch counted as its aftermath")
    p.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    add_output_args(p, "rollout")
    return p.parse_args(argv)


def build_exports(root: Path) -> tuple[Path, Path]:
    from moe_platform.checkpoint.hf import export_hf
    from moe_platform.model.args import ModelArgs
    from moe_platform.model.transformer import build_model
    from moe_platform.tokenizer import save_tokenizer, train_tokenizer

    corpus = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
    text = corpus.read_text()[:200_000] if corpus.exists() else Path(argparse.__file__).read_text()
    tok = train_tokenizer([text[i:i + 2000] for i in range(0, len(text), 2000)], 512)
    tok_dir = save_tokenizer(tok, root / "tokenizer", model_max_length=256)
    args = ModelArgs(vocab_size=tok.get_vocab_size(), dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                     intermediate_size=128, num_experts=8, top_k=2, max_seq_len=256, init_std=0.1)
    return tuple(export_hf(build_model(args, seed=s).state_dict(), args, root / f"v{s}", tokenizer_dir=tok_dir)
                 for s in (0, 1))


class Load:
    """Closed-loop clients; every request recorded as (start, end, status, version) on time.time()."""

    def __init__(self, url: str, clients: int, max_tokens: int):
        self.url, self.clients, self.max_tokens = url, clients, max_tokens
        self.records: list[tuple[float, float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=300) as http:
            async def client() -> None:
                body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": self.max_tokens, "temperature": 0,
                        "ignore_eos": True}
                while not self._stop.is_set():
                    start = time.time()
                    try:
                        r = await http.post("/v1/completions", json=body)
                        status, version = r.status_code, r.headers.get("x-model-version", "")
                    except httpx.HTTPError:
                        status, version = 599, ""
                    self.records.append((start, time.time(), status, version))
            await asyncio.gather(*(client() for _ in range(self.clients)))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(300)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def analyse(records, windows: list[tuple[float, str]], kind: str, steady_s: float, after_s: float) -> dict:
    """Per switch: its window [call, last start on the old version]; the requests in flight across it (overlapping
    it), those that started in the `after_s` seconds after it (the new version warming up), and the steady ones that
    ran and ended in the `steady_s` before the call (warm, before anything changed)."""
    steady, across, after = [], [], []
    spans = []
    for (called, new), nxt in zip(windows, [*windows[1:], (math.inf, "")], strict=True):
        old_starts = [s for s, e, st, v in records if called <= s < nxt[0] and v and v != new]
        end = max(old_starts, default=called)
        spans.append((called, end))
        for start, stop, status, _ in records:
            if status != 200:
                continue
            if called - steady_s + 0.5 <= start and stop < called:
                steady.append(stop - start)
            elif start <= end and stop >= called:
                across.append(stop - start)
            elif end < start <= end + after_s:
                after.append(stop - start)
    ms = {name: 1e3 * p99(values) for name, values in
          (("steady", steady), ("across", across), ("after", after), ("switch", across + after))}
    return {"system": kind, "switches": len(windows), "requests": len(records),
            "failed": sum(1 for r in records if r[2] != 200), "steady": len(steady), "across": len(across),
            "after": len(after), "steady_p99_ms": ms["steady"], "across_p99_ms": ms["across"],
            "after_p99_ms": ms["after"], "added_p99_ms": ms["switch"] - ms["steady"],
            "added_across_p99_ms": ms["across"] - ms["steady"],
            "switch_window_ms": 1e3 * sorted(e - s for s, e in spans)[len(spans) // 2]}


def main(argv=None) -> int:
    import ray
    from ray import serve

    from moe_platform.serving import rollout_controller
    from moe_platform.serving.app import build_app
    from moe_platform.train.launch import free_port

    args = parse_args(argv)
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        a, b = build_exports(Path(tmp))
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        common = {"num_replicas": 1, "metrics_interval_s": 0.25, "admin_api_key": ADMIN,
                  "priority_over_training": False,
                  "engine": {"max_batch_size": 16, "batch_wait_timeout_s": 0.0},
                  "audit_log": str(Path(tmp) / "audit.jsonl")}
        http = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {ADMIN}"})
        results = {}
        try:
            # ours: one app holding both versions
            serve.run(build_app({"model": str(a), "version": "blue", "versions": {"green": str(b)}, **common}),
                      name="ours", route_prefix="/", blocking=False)
            controller = rollout_controller.existing("ours")
            ours_windows, peer_windows = [], []
            ours_records, peer_records = [], []
            for i in range(2 * args.switches):
                target = "green" if i % 2 == 0 else "blue"
                with Load(url, args.clients, args.max_tokens) as load:
                    time.sleep(args.steady_s)  # steady load before the switch (measured, not synchronisation)
                    called = time.time()
                    gates = {"min_requests": 1, "max_p99_ttft_ratio": 100, "max_p99_latency_ratio": 100}
                    r = http.post("/admin/rollout", json={"action": "start", "to": target, "blue_green": True,
                                                          "dwell_s": 0, "gates": gates})
                    assert r.status_code == 200, r.text
                    while (state := rollout_controller.result(controller.status.remote()))["state"] == "running":
                        time.sleep(0.25)  # asks the controller itself, not the replica under measurement
                    assert state["state"] == "promoted", state
                    time.sleep(args.steady_s)
                ours_windows.append((called, target))
                ours_records += load.records
                print(f"ours switch {i + 1}: to {target}", flush=True)
            serve.delete("ours")
            # peer: Serve redeploys the app on the other model
            for i in range(2 * args.switches):
                model, name = (b, "green") if i % 2 else (a, "blue")
                app = build_app({"model": str(model), "version": name, **common})
                if i == 0:
                    serve.run(app, name="peer", route_prefix="/", blocking=False)
                    continue
                with Load(url, args.clients, args.max_tokens) as load:
                    time.sleep(args.steady_s)
                    called = time.time()
                    serve.run(app, name="peer", route_prefix="/", blocking=False)
                    time.sleep(args.steady_s)
                peer_windows.append((called, name))
                peer_records += load.records
                print(f"peer switch {i}: to {name}", flush=True)
            results["ours"] = analyse(ours_records, ours_windows, "ours: blue-green rollout", args.steady_s,
                                      args.after_s)
            results["peer"] = analyse(peer_records, peer_windows, "peer: Serve redeploy", args.steady_s, args.after_s)
        finally:
            serve.shutdown()
            ray.shutdown()
    ours, peer = results["ours"], results["peer"]
    recorded = {"args": {k: v for k, v in vars(args).items() if not k.startswith("out_") and k != "port"},
                "results": [ours, peer], "added_vs_peer": ours["added_p99_ms"] / peer["added_p99_ms"],
                "target_ms": TARGET_MS, "met": max(ours["added_p99_ms"], ours["added_across_p99_ms"]) < TARGET_MS
                and ours["failed"] == 0}
    for r in recorded["results"]:
        print(f"{r['system']}: added p99 {r['added_p99_ms']:.1f} ms over the switch and its {args.after_s:.0f} s "
              f"aftermath, {r['added_across_p99_ms']:.1f} ms in flight across it (p99 steady {r['steady_p99_ms']:.1f}, "
              f"across {r['across_p99_ms']:.1f}, after {r['after_p99_ms']:.1f}), failed {r['failed']}/{r['requests']}")
    print(f"added switch latency, ours ÷ peer: {recorded['added_vs_peer']:.3f}; target < {TARGET_MS:.0f} ms: "
          f"{'met' if recorded['met'] else 'not met'}")
    save_result(recorded, args.out_json, args.out_png, plot, dpi=110)
    return 0


def plot(recorded: dict):
    rows = recorded["results"]
    fig, ax = subplots(figsize=(8, 3.8))
    bars = (("steady_p99_ms", "steady", "tab:gray"), ("across_p99_ms", "in flight across the switch", "tab:blue"),
            ("after_p99_ms", f"{recorded['args']['after_s']:.0f} s after it", "tab:orange"))
    for k, (key, label, color) in enumerate(bars):
        ax.bar([i + (k - 1) * 0.27 for i in range(len(rows))], [r[key] for r in rows], width=0.27, label=label,
               color=color)
    for i, r in enumerate(rows):
        top = max(r["steady_p99_ms"], r["across_p99_ms"], r["after_p99_ms"])
        ax.annotate(f"added p99 {r['added_p99_ms']:+.0f} ms, {r['failed']} failed", (i, top), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [r["system"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("p99 request latency (ms)")
    ax.set_title(f"model switch under load: added p99, ours ÷ Serve redeploy = {recorded['added_vs_peer']:.3f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
