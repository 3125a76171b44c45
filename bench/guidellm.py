"""Our server under guidellm, the open-source benchmark tool for OpenAI-compatible servers: its client-side report
against our own server-side figures (GET /metrics, vLLM's names), at a sweep of request rates, same run.

One tiny MoE (dim 128, 4 layers, 8 experts top-2, random weights) is served by one replica on loopback. For each rate
in `--rates`, guidellm sends `--requests` streamed completions at that constant rate (synthetic prompts of
`--prompt-tokens` tokens, `--output-tokens` tokens out, its tokenizer read from the export) and writes its JSON
report; the app's /metrics is read before and after. Compared per rate: requests and prompt and output tokens (the
tokens per request must agree exactly; guidellm's report leaves out a request still in flight when its limit stops
the run, which the server finishes), and mean end-to-end latency and time to first token (guidellm measures at the
client, so they include HTTP and Ray Serve's proxy; our latency starts in the replica's handler, our time to first
token in the engine).

guidellm is not a runtime dependency: `bash scripts/setup-guidellm.sh` puts it in a venv of its own (its pins clash
with the lock in constraints.txt), which this benchmark uses by default; or `--guidellm PATH` to its executable.

    python bench/guidellm.py                 # ~2 minutes
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _output import add_output_args, save_result, subplots, tool  # noqa: E402

MODEL = "moe-platform"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="1,2,4,8", help="request rates (requests/s), comma-separated")
    p.add_argument("--requests", type=int, default=40, help="requests per rate")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--guidellm", default=None, help="the guidellm executable (default: scripts/setup-guidellm.sh's)")
    p.add_argument("--port", type=int, default=0)
    add_output_args(p, "guidellm")
    p.add_argument("--out-report", default=str(REPO / "docs" / "guidellm_report.json"),
                   help="guidellm's own JSON report of the last rate")
    return p.parse_args(argv)


def build_export(root: Path) -> Path:
    from moe_platform.checkpoint.hf import export_hf
    from moe_platform.model.args import ModelArgs
    from moe_platform.model.transformer import build_model
    from moe_platform.tokenizer import save_tokenizer, train_tokenizer

    corpus = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
    text = corpus.read_text()[:200_000] if corpus.exists() else Path(argparse.__file__).read_text()
    tok = train_tokenizer([text[i:i + 2000] for i in range(0, len(text), 2000)], 1024)
    tok_dir = save_tokenizer(tok, root / "tokenizer", model_max_length=512)
    args = ModelArgs(vocab_size=tok.get_vocab_size(), dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                     intermediate_size=256, num_experts=8, top_k=2, max_seq_len=512, init_std=0.1)
    return export_hf(build_model(args, seed=0).state_dict(), args, root / "export", tokenizer_dir=tok_dir)


def server_figures(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if "le" not in s.labels:
                out[s.name] = s.value
    return out


def delta(after: dict, before: dict, name: str) -> float:
    return after[name] - before[name]


def run_rate(args, guidellm: str, url: str, export: Path, rate: float, report: Path) -> dict:
    before = server_figures(url)
    cmd = [guidellm, "run", "--backend", f"kind=openai_http,target={url},model={MODEL}",
           "--profile", f"kind=constant,rate={rate}", "--constraint", f"kind=max_requests,count={args.requests}",
           "--tokenizer", f"kind=huggingface_auto,model={export}",
           "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
           "--output", f"kind=json,path={report}", "--disable-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"guidellm failed ({done.returncode}): {done.stderr[-2000:] or done.stdout[-2000:]}")
    m = json.loads(report.read_text())["benchmarks"][0]["metrics"]
    theirs = {"requests": m["request_totals"]["successful"],
              "prompt_tokens": m["prompt_token_count"]["successful"]["total_sum"],
              "output_tokens": m["output_token_count"]["successful"]["total_sum"],
              "mean_latency_s": m["request_latency"]["successful"]["mean"],
              "mean_ttft_s": m["time_to_first_token_ms"]["successful"]["mean"] / 1e3}
    end = time.monotonic() + 30  # the replicas report every metrics interval
    while True:
        after = server_figures(url)
        if delta(after, before, "vllm:request_success_total") >= theirs["requests"] or time.monotonic() > end:
            break
        time.sleep(0.5)
    requests = delta(after, before, "vllm:e2e_request_latency_seconds_count")
    ours = {"requests": delta(after, before, "vllm:request_success_total"),
            "prompt_tokens": delta(after, before, "vllm:prompt_tokens_total"),
            "output_tokens": delta(after, before, "vllm:generation_tokens_total"),
            "mean_latency_s": delta(after, before, "vllm:e2e_request_latency_seconds_sum") / requests,
            "mean_ttft_s": delta(after, before, "vllm:time_to_first_token_seconds_sum") /
            delta(after, before, "vllm:time_to_first_token_seconds_count")}
    for side in (theirs, ours):
        side["prompt_tokens_per_request"] = side["prompt_tokens"] / side["requests"]
        side["output_tokens_per_request"] = side["output_tokens"] / side["requests"]
    return {"rate": rate, "guidellm": theirs, "ours": ours,
            "ratio": {k: theirs[k] / ours[k] if ours[k] else None for k in theirs}}


def main(argv=None) -> int:
    import ray
    from ray import serve

    from moe_platform.serving.app import start_server
    from moe_platform.train.launch import free_port

    args = parse_args(argv)
    if args.guidellm is None:
        args.guidellm = tool("setup-guidellm.sh")
    guidellm = shutil.which(args.guidellm) or (args.guidellm if Path(args.guidellm).is_file() else None)
    if guidellm is None:
        raise SystemExit(f"{args.guidellm!r} not found: bash scripts/setup-guidellm.sh (or pass --guidellm PATH)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-guidellm-") as tmp:
        export = build_export(Path(tmp))
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            url = start_server(export, port=args.port or free_port(), num_replicas=1, priority_over_training=False,
                               engine={"batch_wait_timeout_s": 0.0})
            for rate in (float(r) for r in args.rates.split(",")):
                rows.append(run_rate(args, guidellm, url, export, rate, Path(tmp) / "report.json"))
                g, o = rows[-1]["guidellm"], rows[-1]["ours"]
                print(f"rate {rate:g}/s: requests {g['requests']} vs {o['requests']:g}, output tokens "
                      f"{g['output_tokens']:g} vs {o['output_tokens']:g}, mean latency {g['mean_latency_s'] * 1e3:.1f}"
                      f" vs {o['mean_latency_s'] * 1e3:.1f} ms, mean TTFT {g['mean_ttft_s'] * 1e3:.1f} vs "
                      f"{o['mean_ttft_s'] * 1e3:.1f} ms (guidellm vs ours)", flush=True)
            shutil.copy(Path(tmp) / "report.json", args.out_report)
        finally:
            serve.shutdown()
            ray.shutdown()
    version = subprocess.run([guidellm, "--version"], capture_output=True, text=True).stdout.strip().split()[-1]
    # guidellm leaves out of its report a request still in flight when its request limit stops the run, which the
    # server did finish; what each request carried must agree exactly
    counts_agree = all(r["ratio"][k] == 1.0 for r in rows
                       for k in ("prompt_tokens_per_request", "output_tokens_per_request"))
    recorded = {"args": {k: v for k, v in vars(args).items() if k in ("rates", "requests", "prompt_tokens",
                                                                    "output_tokens")},
                "guidellm_version": version, "results": rows, "counts_agree": counts_agree}
    print(f"guidellm {version}: tokens per request {'agree' if counts_agree else 'DISAGREE'} at every rate")
    save_result(recorded, args.out_json, args.out_png, plot, dpi=110)
    return 0


def plot(recorded: dict):
    rows = recorded["results"]
    rates = [r["rate"] for r in rows]
    fig, axes = subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in zip(axes, ("mean_latency_s", "mean_ttft_s"), ("mean end-to-end latency (ms)",
                                                                       "mean time to first token (ms)"), strict=True):
        ax.plot(rates, [r["guidellm"][key] * 1e3 for r in rows], "o-", label="guidellm (client)")
        ax.plot(rates, [r["ours"][key] * 1e3 for r in rows], "s-", label="ours: /metrics (engine)")
        ax.set_xlabel("request rate (requests/s)")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"guidellm {recorded['guidellm_version']} against our server's own figures (same run)")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
