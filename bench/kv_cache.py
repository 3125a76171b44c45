"""The paged KV cache against the slot cache, and prefix caching on against off, in one run on one export.

The model is bench/serve.py's (dim 256, 4 layers, 16 experts top-2, vocab 4096, random weights), with a 2048-token
context. Everything runs on the engine in-process (no HTTP), one torch thread, greedy, EOS ignored.

1. Peak concurrency at a fixed KV memory budget, on bench/serve.py's mixed trace (prompts of 16-512 tokens, outputs
   of 16-256), every request submitted at once: the budget is what `--slots` sequences take in the slot cache
   (`max_seq_len` + one prefill budget of positions each). The slot layout (the peer) runs at most that many
   sequences; the paged layout runs as many as its blocks hold (`max_batch_size` 512). Reported: the most sequences
   running at once, tokens/s over the whole trace, and preemptions. Target: paged ÷ slots >= 4x.
2. Shared prefix: one `--system-tokens` system prompt and short user turns (`--turn-tokens`), `--prefix-requests`
   requests arriving as a Poisson process at `--prefix-rate`/s, `--output-tokens` each. The same trace runs with
   prefix caching and without (the peer), in alternating rounds. Reported: time to first token (mean, p50, p99) and
   the prefix cache's hit rate. Target: mean TTFT without ÷ with >= 5x.
3. Multi-head latent attention (`--part mla`): a DeepSeek-V3-shaped model (the same size, 16 heads of 32+16 query/key
   and 32 value dims, a 64-dim latent, sigmoid routing in expert groups, a dense first layer) on the latent cache
   against the same model on the expanded cache (`mla_kv_cache: expanded`, the peer). Reported: KV bytes per token
   (measured from the caches, and the arithmetic from the shapes), peak concurrent sequences of the mixed trace at a
   fixed budget (what `--mla-sequences` full-length sequences take expanded), and decode tokens/s with
   `--decode-batch` sequences decoding together (in alternating rounds). Target: latent decode tokens/s >= expanded.
   It is recorded under "mla" in the same JSON, with its own plot.
4. Windowed KV memory (`--part window`): a gpt-oss-shaped model (the same size, a `--window`-token sliding window on
   every other layer, attention sinks) on the paged cache whose sliding layers keep only their window's blocks,
   against the same engine with `windowed_kv_cache: false` (every layer keeps every position; the peer), at a fixed
   KV budget (what `--window-sequences` full-length sequences take without windowing). Every request of a trace whose
   prompts are longer than the window (`--window-prompt` tokens, `--window-output` more) is submitted at once.
   Reported: the most sequences running at once and tokens/s. Recorded under "window", with its own plot.

    python bench/kv_cache.py             # parts 1 and 2, ~4 minutes on 2 CPU cores
    python bench/kv_cache.py --part mla     # part 3, ~3 minutes
    python bench/kv_cache.py --part window  # part 4, ~2 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _output import add_output_args, save_result, subplots  # noqa: E402


def _serve_bench():
    spec = importlib.util.spec_from_file_location("bench_serve", REPO / "bench" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SERVE = _serve_bench()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=96, help="requests of the mixed trace")
    p.add_argument("--slots", type=int, default=16, help="the KV budget: this many slot-cache sequences")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--prefill-token-budget", type=int, default=512)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--turn-tokens", type=int, nargs=2, default=(10, 40), metavar=("MIN", "MAX"))
    p.add_argument("--output-tokens", type=int, default=16, help="tokens per shared-prefix request")
    p.add_argument("--prefix-requests", type=int, default=24)
    p.add_argument("--prefix-rate", type=float, default=1.0, help="shared-prefix arrivals per second")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--part", choices=("paged", "mla", "window"), default="paged",
                   help="paged: paged vs slots and prefix caching (parts 1 and 2); mla: latent vs expanded (part 3); "
                        "window: windowed KV memory vs every position kept (part 4)")
    p.add_argument("--window", type=int, default=128, help="part 4: the sliding window")
    p.add_argument("--window-sequences", type=int, default=8, help="part 4's KV budget: this many full-length "
                                                                   "sequences without windowing")
    p.add_argument("--window-prompt", type=int, nargs=2, default=(384, 768), metavar=("MIN", "MAX"),
                   help="part 4: prompt tokens (longer than the window)")
    p.add_argument("--window-output", type=int, nargs=2, default=(32, 96), metavar=("MIN", "MAX"))
    p.add_argument("--mla-sequences", type=int, default=4, help="part 3's KV budget: this many full-length "
                                                                "sequences of the expanded cache")
    p.add_argument("--decode-batch", type=int, default=64, help="part 3: sequences decoding together")
    p.add_argument("--decode-prompt", type=int, default=256, help="part 3: prompt tokens of each decoding sequence")
    p.add_argument("--decode-tokens", type=int, default=64, help="part 3: tokens each decoding sequence generates")
    add_output_args(p, "kv_cache")
    return p.parse_args(argv)


# A DeepSeek-V3-shaped model at bench/serve.py's size: latent attention (16 heads), sigmoid routing in 4 groups of 4
# experts with its correction bias, one shared expert, a dense first layer.
MLA_MODEL = {"n_heads": 16, "n_kv_heads": 16, "kv_lora_rank": 64, "q_lora_rank": 96, "qk_nope_head_dim": 32,
             "qk_rope_head_dim": 16, "v_head_dim": 32, "rope_interleave": True, "scoring_func": "sigmoid",
             "topk_method": "noaux_tc", "n_group": 4, "topk_group": 2, "balancing": "bias", "n_shared_experts": 1,
             "routed_scaling_factor": 2.5, "dense_layers": "0", "dense_intermediate_size": 1024,
             "hf_architecture": "DeepseekV3ForCausalLM"}


def engine_options(args, **extra) -> dict:
    return {"batch_wait_timeout_s": 0.0, "max_seq_len": args.max_seq_len,
            "prefill_token_budget": args.prefill_token_budget, **extra}


def concurrency(export: Path, args, budget: int, layout: str, **options) -> dict:
    """Run the whole mixed trace at once on one layout; the most sequences running together, tokens/s."""
    from moe_platform.serving.engine import Engine, SamplingParams

    trace = SERVE.make_trace(export, args.requests, 1.0, (16, 512), (16, 256), args.seed)
    engine = Engine.from_pretrained(export, **engine_options(args, kv_cache_layout=layout, max_batch_size=512,
                                                             kv_cache_memory_bytes=budget, **options))
    for r in trace:
        engine.add_request(r.prompt, SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True))
    peak, usage, tokens, start = 0, 0.0, 0, time.perf_counter()
    while engine.has_unfinished():
        tokens += sum(len(o.token_ids) for o in engine.step())
        if engine.scheduler.num_running > peak:
            peak, usage = engine.scheduler.num_running, engine.scheduler.kv_stats()["kv_cache_usage"]
    seconds = time.perf_counter() - start
    stats = engine.stats()
    return {"layout": layout, "kv_cache_bytes": engine.cache.nbytes, "peak_running": peak,
            "kv_usage_at_peak": usage, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "preemptions": stats["num_preemptions"]}


def prefix_trace(export: Path, args) -> list:
    from moe_platform.tokenizer import load_tokenizer

    ids = load_tokenizer(export).encode(SERVE.CORPUS.read_text(encoding="utf-8")[:300_000]).ids
    rng = random.Random(args.seed)
    system = ids[: args.system_tokens]
    t, trace = 0.0, []
    for _ in range(args.prefix_requests):
        n = rng.randint(*args.turn_tokens)
        start = rng.randrange(args.system_tokens, len(ids) - n)
        trace.append(SERVE.Req(t, system + ids[start:start + n], args.output_tokens))
        t += rng.expovariate(args.prefix_rate)
    return trace


def shared_prefix(engine, trace) -> dict:
    """Replay the trace (Poisson arrivals) on a started engine; per-request TTFT."""

    async def replay():
        t0 = time.perf_counter()

        async def at_arrival(req):
            await asyncio.sleep(max(0.0, t0 + req.arrival - time.perf_counter()))
            return await SERVE.stream_engine(engine, req)

        return await asyncio.gather(*(at_arrival(r) for r in trace))

    return [r.ttft for r in asyncio.run(replay())]


def decode_rate(export: Path, args, form: str) -> dict:
    """`--decode-batch` sequences prefilled, then decoded together to the end: decode tokens/s (the steps after the
    last prefill), on the latent or the expanded cache."""
    from moe_platform.serving.engine import Engine, SamplingParams

    trace = SERVE.make_trace(export, args.decode_batch, 1.0, (args.decode_prompt, args.decode_prompt),
                             (args.decode_tokens, args.decode_tokens), args.seed + 1)
    engine = Engine.from_pretrained(export, **engine_options(args, max_batch_size=args.decode_batch,
                                                             mla_kv_cache=form))
    for r in trace:
        engine.add_request(r.prompt, SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True))
    while engine.scheduler.waiting or engine.scheduler.prefilling:  # every sequence prefilled and decoding
        engine.step()
    tokens, start = 0, time.perf_counter()
    while engine.has_unfinished():
        tokens += sum(len(o.token_ids) for o in engine.step())
    seconds = time.perf_counter() - start
    return {"form": form, "decode_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "kv_cache_bytes": engine.cache.nbytes}


def mla_part(args) -> int:
    """Part 3: the latent cache against the expanded one on one DeepSeek-V3-shaped model."""
    from moe_platform.serving.cache import PagedKVCache
    from moe_platform.serving.engine import Engine
    from moe_platform.serving.latent_cache import PagedLatentCache

    with tempfile.TemporaryDirectory(prefix="bench-kv-mla-") as tmp:
        export = SERVE.build_export(Path(tmp), args.seed, max_seq_len=args.max_seq_len, **MLA_MODEL)
        margs = Engine.from_pretrained(export, **engine_options(args, max_batch_size=1)).args
        arithmetic = {"latent": margs.n_layers * (margs.kv_lora_rank + margs.qk_rope_head_dim) * 4,
                      "expanded": margs.n_layers * margs.n_heads * (margs.qk_head_dim + margs.v_head_dim) * 4}
        per_token = {"latent": PagedLatentCache.bytes_per_token(margs, torch.float32),
                     "expanded": PagedKVCache.bytes_per_token(margs, torch.float32)}
        budget = args.mla_sequences * args.max_seq_len * per_token["expanded"]
        conc = {form: concurrency(export, args, budget, "paged", mla_kv_cache=form) for form in ("expanded", "latent")}
        for form, row in conc.items():
            measured = row["kv_cache_bytes"] / (row["kv_cache_bytes"] // (per_token[form] * 16) * 16)
            row.update(form=form, bytes_per_token=measured)
            print(f"{form}: {measured:.0f} B/token (shapes: {arithmetic[form]}), peak {row['peak_running']} "
                  f"sequences at {budget / 2**20:.0f} MiB, {row['preemptions']} preemptions", flush=True)
        rounds: dict[str, list[dict]] = {"expanded": [], "latent": []}
        for r in range(args.rounds):
            for form in rounds:
                rounds[form].append(decode_rate(export, args, form))
                print(f"round {r + 1}, {form}: decode {rounds[form][-1]['tokens_per_s']:.0f} tok/s at "
                      f"{args.decode_batch} sequences", flush=True)
    decode = {form: {"form": form, "tokens_per_s": statistics.mean(x["tokens_per_s"] for x in runs),
                     "rounds": [x["tokens_per_s"] for x in runs], "kv_cache_bytes": runs[0]["kv_cache_bytes"]}
              for form, runs in rounds.items()}
    result = {"args": {k: v for k, v in vars(args).items() if not k.startswith("out_")}, "model": MLA_MODEL,
              "bytes_per_token": {f: conc[f]["bytes_per_token"] for f in conc}, "bytes_per_token_shapes": arithmetic,
              "bytes_ratio": conc["expanded"]["bytes_per_token"] / conc["latent"]["bytes_per_token"],
              "kv_budget_bytes": budget, "concurrency": list(conc.values()),
              "peak_ratio": conc["latent"]["peak_running"] / conc["expanded"]["peak_running"],
              "decode": list(decode.values()),
              "decode_ratio": decode["latent"]["tokens_per_s"] / decode["expanded"]["tokens_per_s"],
              "targets": {"decode_ratio": 1.0}}
    assert result["bytes_per_token"] == {f: float(arithmetic[f]) for f in arithmetic}, result["bytes_per_token"]
    print(f"KV bytes per token expanded ÷ latent: {result['bytes_ratio']:.2f}x (the shapes say "
          f"{arithmetic['expanded'] / arithmetic['latent']:.2f}x); peak sequences latent ÷ expanded "
          f"{result['peak_ratio']:.2f}x; decode tokens/s latent ÷ expanded {result['decode_ratio']:.2f}x (target 1x)")
    out_png = str(Path(args.out_png).with_name(Path(args.out_png).stem + "_mla.png")) if args.out_png else None
    save_result(result, args.out_json, out_png, plot_mla, dpi=110, merge_key="mla")
    return 0


def plot_mla(recorded: dict):
    fig, (a, b, c) = subplots(1, 3, figsize=(12, 3.4))
    forms = ["expanded", "latent"]
    colors = ["tab:gray", "tab:blue"]
    a.bar(forms, [recorded["bytes_per_token"][f] for f in forms], color=colors)
    a.set_ylabel("KV bytes per token")
    a.set_title(f"KV per token ({recorded['bytes_ratio']:.1f}x smaller)", fontsize=9)
    conc = {row["form"]: row for row in recorded["concurrency"]}
    b.bar(forms, [conc[f]["peak_running"] for f in forms], color=colors)
    b.set_title(f"peak sequences at {recorded['kv_budget_bytes'] / 2**20:.0f} MiB ({recorded['peak_ratio']:.2f}x)",
                fontsize=9)
    decode = {row["form"]: row for row in recorded["decode"]}
    c.bar(forms, [decode[f]["tokens_per_s"] for f in forms], color=colors)
    c.set_ylabel("decode tokens/s")
    c.set_title(f"decode at {recorded['args']['decode_batch']} sequences ({recorded['decode_ratio']:.2f}x)",
                fontsize=9)
    fig.tight_layout()
    return fig


def window_model(args) -> dict:
    """A gpt-oss-shaped model at bench/serve.py's size: every other layer a `--window` sliding window, sinks, biases,
    the clamped SwiGLU."""
    return {"n_layers": 4, "head_dim": 64, "sliding_window": args.window, "sliding_layers": "0,2",
            "attention_sinks": True, "attention_bias": True, "o_proj_bias": True, "router_bias": True,
            "expert_bias": True, "expert_activation": "clamped_swiglu", "hf_architecture": "GptOssForCausalLM"}


def window_concurrency(export: Path, args, budget: int, windowed: bool) -> dict:
    """Every request of the long-prompt trace at once: the most sequences running together, tokens/s."""
    from moe_platform.serving.engine import Engine, SamplingParams

    trace = SERVE.make_trace(export, args.requests, 1.0, tuple(args.window_prompt), tuple(args.window_output),
                             args.seed)
    engine = Engine.from_pretrained(export, **engine_options(args, max_batch_size=512, kv_cache_memory_bytes=budget,
                                                             windowed_kv_cache=windowed))
    for r in trace:
        engine.add_request(r.prompt, SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True))
    peak, tokens, start = 0, 0, time.perf_counter()
    while engine.has_unfinished():
        tokens += sum(len(o.token_ids) for o in engine.step())
        peak = max(peak, engine.scheduler.num_running)
    seconds = time.perf_counter() - start
    return {"windowed": windowed, "kv_cache_bytes": engine.cache.nbytes, "peak_running": peak, "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "preemptions": engine.stats()["num_preemptions"]}


def window_part(args) -> int:
    """Part 4: windowed KV memory against every position kept, on one gpt-oss-shaped model."""
    from moe_platform.serving.cache import PagedKVCache
    from moe_platform.serving.engine import Engine

    model = window_model(args)
    with tempfile.TemporaryDirectory(prefix="bench-kv-window-") as tmp:
        export = SERVE.build_export(Path(tmp), args.seed, max_seq_len=args.max_seq_len, **model)
        margs = Engine.from_pretrained(export, **engine_options(args, max_batch_size=1)).args
        budget = args.window_sequences * args.max_seq_len * PagedKVCache.bytes_per_token(margs, torch.float32)
        rows = [window_concurrency(export, args, budget, windowed) for windowed in (False, True)]
    for row in rows:
        print(f"windowed {row['windowed']}: peak {row['peak_running']} sequences at {budget / 2**20:.0f} MiB, "
              f"{row['tokens_per_s']:.0f} tok/s, {row['preemptions']} preemptions", flush=True)
    plain, windowed = rows
    result = {"args": {k: v for k, v in vars(args).items() if not k.startswith("out_")}, "model": model,
              "kv_budget_bytes": budget, "concurrency": rows,
              "peak_ratio": windowed["peak_running"] / plain["peak_running"],
              "tokens_per_s_ratio": windowed["tokens_per_s"] / plain["tokens_per_s"]}
    print(f"peak sequences windowed ÷ every position kept: {result['peak_ratio']:.2f}x; tokens/s "
          f"{result['tokens_per_s_ratio']:.2f}x")
    out_png = str(Path(args.out_png).with_name(Path(args.out_png).stem + "_window.png")) if args.out_png else None
    save_result(result, args.out_json, out_png, plot_window, dpi=110, merge_key="window")
    return 0


def plot_window(recorded: dict):
    fig, (a, b) = subplots(1, 2, figsize=(8, 3.4))
    names = ["every position", "windowed"]
    rows = recorded["concurrency"]
    a.bar(names, [r["peak_running"] for r in rows], color=["tab:gray", "tab:blue"])
    a.set_title(f"peak sequences at {recorded['kv_budget_bytes'] / 2**20:.0f} MiB ({recorded['peak_ratio']:.2f}x)",
                fontsize=9)
    b.bar(names, [r["tokens_per_s"] for r in rows], color=["tab:gray", "tab:blue"])
    b.set_ylabel("tokens/s")
    b.set_title(f"whole trace ({recorded['tokens_per_s_ratio']:.2f}x)", fontsize=9)
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    from moe_platform.serving.cache import PagedKVCache
    from moe_platform.serving.engine import Engine

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.part == "mla":
        return mla_part(args)
    if args.part == "window":
        return window_part(args)
    with tempfile.TemporaryDirectory(prefix="bench-kv-") as tmp:
        export = SERVE.build_export(Path(tmp), args.seed, max_seq_len=args.max_seq_len)
        probe = Engine.from_pretrained(export, **engine_options(args, max_batch_size=1))
        per_token = PagedKVCache.bytes_per_token(probe.args, torch.float32)
        budget = args.slots * (args.max_seq_len + args.prefill_token_budget) * per_token
        del probe
        conc = {layout: concurrency(export, args, budget, layout) for layout in ("slots", "paged")}
        for row in conc.values():
            print(f"{row['layout']}: peak {row['peak_running']} sequences (KV {row['kv_usage_at_peak']:.0%} used), "
              f"{row['tokens_per_s']:.0f} tok/s, "
                  f"{row['preemptions']} preemptions, KV {row['kv_cache_bytes'] / 2**20:.0f} MiB", flush=True)
        trace = prefix_trace(export, args)
        engines = {name: Engine.from_pretrained(export, **engine_options(args, enable_prefix_caching=on)).start()
                   for name, on in (("without", False), ("with", True))}
        ttft: dict[str, list[float]] = {name: [] for name in engines}
        for r in range(args.rounds):
            for name, engine in engines.items():
                ttft[name] += shared_prefix(engine, trace)
                print(f"round {r + 1}, prefix caching {name}: mean TTFT {statistics.mean(ttft[name]) * 1e3:.0f} ms",
                      flush=True)
        prefix = {}
        for name, engine in engines.items():
            stats = engine.stats()
            engine.shutdown()
            values = sorted(ttft[name])
            prefix[name] = {"prefix_caching": name, "ttft_mean_s": statistics.mean(values),
                            "ttft_p50_s": SERVE.pct(values, 50), "ttft_p99_s": SERVE.pct(values, 99),
                            "hit_rate": stats["prefix_cache_hits"] / max(1, stats["prefix_cache_queries"])}
    peak_ratio = conc["paged"]["peak_running"] / conc["slots"]["peak_running"]
    ttft_ratio = prefix["without"]["ttft_mean_s"] / prefix["with"]["ttft_mean_s"]
    recorded = {"args": {k: v for k, v in vars(args).items() if not k.startswith("out_")},
                "kv_budget_bytes": budget, "concurrency": list(conc.values()), "prefix": list(prefix.values()),
                "peak_ratio": peak_ratio, "tokens_per_s_ratio": conc["paged"]["tokens_per_s"] /
                conc["slots"]["tokens_per_s"], "ttft_ratio": ttft_ratio,
                "targets": {"peak_ratio": 4.0, "ttft_ratio": 5.0}}
    print(f"peak sequences paged ÷ slots at {budget / 2**20:.0f} MiB: {peak_ratio:.2f}x (target 4x); tokens/s "
          f"{recorded['tokens_per_s_ratio']:.2f}x")
    print(f"mean TTFT without ÷ with prefix caching: {ttft_ratio:.2f}x (target 5x); hit rate "
          f"{prefix['with']['hit_rate']:.3f}")
    save_result(recorded, args.out_json, args.out_png, plot, dpi=110, keep=("mla", "window"))
    return 0


def plot(recorded: dict):
    fig, (a, b) = subplots(1, 2, figsize=(10, 3.6))
    conc = recorded["concurrency"]
    a.bar([c["layout"] for c in conc], [c["peak_running"] for c in conc], color=["tab:gray", "tab:blue"])
    for i, c in enumerate(conc):
        a.annotate(f"{c['peak_running']} seq, {c['tokens_per_s']:.0f} tok/s", (i, c["peak_running"]), ha="center",
                   va="bottom", fontsize=8)
    a.set_title(f"peak sequences at {recorded['kv_budget_bytes'] / 2**20:.0f} MiB of KV "
                f"({recorded['peak_ratio']:.2f}x)", fontsize=9)
    rows = recorded["prefix"]
    names = [f"prefix caching {r['prefix_caching']}" for r in rows]
    for j, (key, label) in enumerate((("ttft_p50_s", "p50"), ("ttft_mean_s", "mean"), ("ttft_p99_s", "p99"))):
        b.bar([x + 0.27 * (j - 1) for x in range(len(rows))], [r[key] * 1e3 for r in rows], width=0.27, label=label)
    b.set_xticks(range(len(rows)), names)
    b.set_ylabel("time to first token (ms)")
    b.set_title(f"shared {recorded['args']['system_tokens']}-token system prompt ({recorded['ttft_ratio']:.2f}x)",
                fontsize=9)
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
