"""The markdown tables of docs/benchmarks.md, rendered from the JSON each benchmark writes (docs/bench_NAME.json).

    python bench/_tables.py            # print every table
    python bench/_tables.py serve      # one

docs/benchmarks.md holds these tables verbatim; tests/unit/test_bench_docs.py fails when a table there differs from
what its committed JSON renders to, so the figures in the docs are always the figures of the run recorded beside them.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list]) -> str:
    return "\n".join([_row(*header), _row(*["---"] * len(header)), *(_row(*r) for r in rows)])


def moe_layer(d: dict) -> str:
    rows = []
    for r in d["results"]:
        headline = r["name"] == "ours (dropless)"
        frac = f"**{r['frac_ceiling']:.2f}**" if headline else f"{r['frac_ceiling']:.2f}"
        vs = r.get("vs_deepspeed_dropless")
        vs = "–" if vs is None else (f"**{vs:.2f}×**" if headline else f"{vs:.2f}×")
        rows.append([r["name"], f"{r['ms']:.1f}", f"{r['gflops']:.1f}", frac, vs])
    return _table(["implementation", "ms fwd+bwd", "GFLOP/s", "of ceiling", "vs DeepSpeed dropless"], rows)


def layouts(d: dict) -> str:
    rows = []
    for r in d["rows"]:
        bubble = f"{r['bubble_measured']:.2f}" if "bubble_measured" in r else "–"
        theory = f"{r['bubble_theory']:.2f}" if "bubble_theory" in r else "–"
        rows.append([r["name"], r["micro_batches_per_rank"], f"{r['step_s']:.3f}", f"{r['tokens_per_s']:.0f}",
                     f"{r['speedup_vs_single']:.2f}", bubble, theory])
    return _table(["layout", "m/rank", "step s", "tokens/s", "vs 1 process", "bubble measured", "1F1B theory"], rows)


def checkpoint(d: dict) -> str:
    m = d["median"]
    rows = [["ours, synchronous", f"{m['sync']:.3f}"], ["ours, asynchronous", f"{m['async']:.3f}"],
            ["(ours, background write, not blocking)", f"{m['async_background_write']:.3f}"],
            ["PyTorch DCP `save`", f"{m['dcp_sync']:.3f}"], ["PyTorch DCP `async_save`", f"{m['dcp_async']:.3f}"],
            ["(DCP `async_save` until written, not blocking)", f"{m['dcp_async_total']:.3f}"]]
    table = _table(["mode", f"blocking s (median of {d['args']['repeats']})"], rows)
    return (f"{table}\n\nasync ÷ sync blocking: ours **{d['ratio']:.3f}**, PyTorch DCP {d['dcp_ratio']:.3f}; "
            f"our async ÷ DCP async_save: {d['async_vs_dcp_async']:.2f}")


def ray_overhead(d: dict) -> str:
    text = _overhead(d, "Steady-state tokens/s Ray ÷ plain")
    if "pinned" in d:
        p = d["pinned"]
        text += (f"\n\nPinned, the shape of a GPU node: dp{p['args']['dp']}, the rank alone on core(s) "
                 f"{p['args']['rank_cpus']}, the driver, Ray's daemons, Ray Train's actors and the plain launcher on "
                 f"core(s) {p['args']['host_cpus']}, {p['args']['steps']} steps, {p['args']['rounds']} rounds.\n\n"
                 + _overhead(p, "Pinned, steady-state tokens/s Ray ÷ plain"))
    return text


def _overhead(d: dict, headline: str) -> str:
    names = {"plain": "plain processes", "ray": "Ray Train", "beside_ray": "plain processes, idle Ray beside"}
    rows = []
    for key, label in names.items():
        s = d["summary"][key]
        runs = ", ".join(f"{r['tokens_per_s']:.0f}" for r in d["runs"] if r["launcher"] == key)
        rows.append([label, f"{s['tokens_per_s']:.0f}", runs, f"{s['trainer_tokens_per_s']:.0f}",
                     f"{s['time_to_first_step_s']:.2f}", f"{s['time_to_first_step_after_ray_init_s']:.2f}"])
    table = _table(["launcher", "tokens/s (wall), median", f"the {d['args']['rounds']} runs",
                    "trainer step time, tokens/s", "time to first step s", "excl. `ray.init`"], rows)
    rr = d["round_ratios"]
    return (f"{table}\n\n{headline}: **{d['ratio']:.3f}** (rounds "
            f"{', '.join(f'{v:.3f}' for v in rr['ray/plain'])}); plain beside an idle Ray ÷ plain: "
            f"{statistics.median(rr['beside_ray/plain']):.3f}; Ray ÷ plain beside Ray: "
            f"{statistics.median(rr['ray/beside_ray']):.3f}")


def goodput(d: dict) -> str:
    base = d["baseline"]
    rows = [["uninterrupted", 1, f"{base['wall_s']:.1f}", f"{d['args']['steps'] / base['wall_s']:.3f}", "1.000"],
            [f"killed every {d['args']['interrupt_every']:.0f} s", d["preemptions"] + 1,
             f"{d['total_interrupted_s']:.1f}", f"{d['args']['steps'] / d['total_interrupted_s']:.3f}",
             f"{d['goodput_measured']:.3f}"]]
    table = _table(["run", "launches", "wall s", "steps/s", "goodput"], rows)
    text = (f"{table}\n\nCost per preemption {d['cost_per_preemption_s']:.1f} s (restart "
            f"{d['restart_s']:.1f} s, lost steps {d['lost_steps']}); extrapolated to one preemption per "
            f"{d['period_s'] / 60:.0f} minutes: goodput **{d['goodput_at_period']:.3f}**")
    return text + ("\n\n" + goodput_ray(d["ray"], d["period_s"]) if "ray" in d else "")


def goodput_ray(r: dict, period_s: float) -> str:
    """The Ray Train section: measured goodput with reclaim notices and with hard kills, against the same run with no
    preemption; the extrapolation to one preemption per `period_s` uses each mode's measured cost per preemption."""
    base = r["runs"]["baseline"]
    rows = [["no preemption", 0, f"{base['wall_s']:.1f}", "1.000", "–", "–"]]
    names = {"notice": "reclaim notice → spot agent drain", "kill": "hard kill (no notice)"}
    for mode in ("notice", "kill"):
        s, run = r["summary"][mode], r["runs"][mode]
        rows.append([names[mode], s["preemptions"], f"{run['wall_s']:.1f}", f"{s['goodput']:.3f}",
                     f"{s['lost_steps_per_preemption']:.1f} ({run['lost_steps']})",
                     f"{s['cost_per_preemption_s']:.1f}"])
    table = _table(["Ray Train run", "preemptions", "wall s", "goodput", "lost steps / preemption",
                    "cost / preemption s"], rows)
    a = r["args"]
    notice, kill = r["summary"]["notice"], r["summary"]["kill"]
    text = (f"{table}\n\nUnder Ray Train, one worker, {a['steps']} steps, checkpoint every {a['checkpoint_interval']} "
            f"steps, a preemption every {a['interrupt_every']:.0f} s of training, notices {a['notice_deadline']:.0f} s "
            f"ahead. Extrapolated with each measured cost to one preemption per {period_s / 60:.0f} minutes: "
            f"notice **{1 - notice['cost_per_preemption_s'] / period_s:.3f}**, hard kill "
            f"**{1 - kill['cost_per_preemption_s'] / period_s:.3f}**")
    if r.get("notice_cost_vs_kill") is not None:
        text += f"; a notice costs **{r['notice_cost_vs_kill']:.2f}×** a hard kill"
    if r.get("notice_gap_vs_kill") is not None:
        gap = {m: r["summary"][m]["gap_cost_per_preemption_s"] for m in ("notice", "kill")}
        text += (f". Measured on each run's own resumes (the gap at each resume, less one step): notice "
                 f"{gap['notice']:.1f} s, hard kill {gap['kill']:.1f} s, **{r['notice_gap_vs_kill']:.2f}×**; Ray's "
                 f"node health checks: {r.get('health_checks', 'fast')}")
    return text


def serve(d: dict) -> str:
    rows = []
    for r in d["table"]:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        met = "" if r["met"] is None else ("yes" if r["met"] else "no")
        rows.append([r["metric"], f"{r['a']:.3f}", f"{r['b']:.3f}", ratio, r["target"], met])
    return _table(["metric", "value", "peer", "ratio", "target", "met"], rows)


def memory(d: dict) -> str:
    rows = []
    for r in d["results"]:
        ours = r["impl"] == "ours"
        ratio = f"**{r['peak_vs_none']:.3f}**" if ours and r["mode"] != "none" else f"{r['peak_vs_none']:.3f}"
        rows.append([r["impl"], r["mode"], f"{r['peak_bytes'] / 2**20:.1f}", ratio, f"{r['saved_bytes'] / 2**20:.1f}",
                     f"{r['step_s']:.2f}", f"{r['time_vs_none']:.2f}"])
    a = d["args"]
    table = _table(["implementation", "checkpointing", f"peak step MiB ({a['device']})", "peak ÷ none",
                    "activations saved MiB", "step s", "time ÷ none"], rows)
    return (f"{table}\n\nd={a['dim']}, {a['layers']} layers, {a['experts']} experts top-2, I={a['intermediate']}, "
            f"vocab {a['vocab']}, {a['batch']}×{a['seq']} tokens. Peak with full checkpointing, ours ÷ transformers: "
            f"{d['full_vs_transformers_full_peak']:.3f}")


def lora(d: dict) -> str:
    rows = []
    for r in d["results"]:
        what = "all weights" if r["mode"] == "full" else f"rank {d['args']['rank']}: {r['targets']}"
        state = f"**{r['state_vs_full']:.4f}**" if r["impl"] == "ours" and r["mode"] == "lora" else \
            f"{r['state_vs_full']:.4f}"
        rows.append([r["impl"], what, f"{r['trainable_params']:,}", f"{r['optimizer_state_bytes'] / 2**20:.2f}",
                     state, f"{r['peak_bytes'] / 2**20:.1f}", f"{r['peak_vs_full']:.3f}", f"{r['step_s']:.3f}",
                     f"{r['time_vs_full']:.2f}"])
    a = d["args"]
    table = _table(["implementation", "trains", "trainable params", "optimizer state MiB", "state ÷ full",
                    f"peak MiB ({a['device']})", "peak ÷ full", "step s", "time ÷ full"], rows)
    return (f"{table}\n\nd={a['dim']}, {a['layers']} layers, {a['experts']} experts top-2 (I={a['moe_intermediate']}), "
            f"vocab {a['vocab']}, {a['batch']}×{a['seq']} tokens per step. Ours ÷ peft, attention LoRA: step time "
            f"{d['lora_step_vs_peft']:.2f}, peak {d['lora_peak_vs_peft']:.2f}, optimizer state "
            f"{d['lora_state_vs_peft']:.2f}")


def dpo(d: dict) -> str:
    a = d["args"]
    rows = []
    for r in d["results"]:
        reference = "the base, adapters off" if r["reference"] == "base" else "a separate copy"
        rows.append([r["impl"], reference, f"{r['reference_copy_params']:,}", f"{r['peak_bytes'] / 2**20:.1f}",
                     f"{r['step_s']:.3f}", f"{r['step_median_s']:.3f}", f"{r['load_1m'][0]:.1f}–{r['load_1m'][1]:.1f}"])
    table = _table(["implementation", "reference", "reference copy params", f"peak MiB ({a['device']})",
                    "step s (fastest)", "step s (median)", "load avg"], rows)
    return (f"{table}\n\nd={a['dim']}, {a['layers']} layers, {a['experts']} experts top-2 (I={a['moe_intermediate']}), "
            f"vocab {a['vocab']}, LoRA rank {a['rank']} on the attention projections, {a['pairs']} pairs × 2 × "
            f"{a['seq']} tokens per step. Ours ÷ TRL, the base as reference: step time "
            f"**{d['step_ours_vs_trl']:.2f}**, peak memory **{d['peak_ours_vs_trl']:.2f}** (with a separate copy: "
            f"{d['copy_step_ours_vs_trl']:.2f}, {d['copy_peak_ours_vs_trl']:.2f}). Peak with the base as reference ÷ "
            f"with a separate copy: ours **{d['ours_base_vs_copy_peak']:.3f}**, TRL {d['trl_base_vs_copy_peak']:.3f}")


def grpo(d: dict) -> str:
    a, s = d["args"], d["sync"]
    rows = []
    for impl, name in (("ours", "ours (our engine)"), ("trl", "TRL GRPOTrainer (transformers generate)")):
        r = d[impl]
        rows.append([name, f"{r['step_s']:.2f}", f"{r['generate_s']:.2f}", f"{r['score_s']:.4f}", f"{r['learn_s']:.2f}",
                     f"{r['sync_s']:.4f}", f"{r['step_median_s']:.2f}", f"{r['tokens_per_step']:.0f}",
                     f"{r['load_1m'][0]:.1f}–{r['load_1m'][1]:.1f}"])
    steps = _table(["implementation", "step s (fastest)", "generate s", "score s", "learn s", "sync s",
                     "step s (median)", "completion tokens a step", "load avg"], rows)
    sync = _table(["what moves", "MiB", "seconds (median)", "seconds per GB", "load avg"], [
        *([f"full weights, object store to a rollout worker ({store} object store)", f"{r['bytes'] / 2**20:.0f}",
           f"{statistics.median(r['full_s']):.3f}", f"{r['full_s_per_gb']:.3f}",
           f"{r['load_1m'][0]:.1f}–{r['load_1m'][1]:.1f}"]
          for r, store in ((s, "preallocated"), (d["sync_default"], "Ray's default"))),
        ["memcpy of the same bytes", f"{s['bytes'] / 2**20:.0f}", f"{statistics.median(s['memcpy_s']):.3f}",
         f"{s['memcpy_s_per_gb']:.3f}", ""],
        ["LoRA adapters only", f"{s['adapter_bytes'] / 2**20:.1f}", f"{s['adapter_sync_s']:.3f}",
         f"{s['adapter_sync_s'] / (s['adapter_bytes'] / 1e9):.3f}", ""]])
    return (f"{steps}\n\nd={a['dim']}, {a['layers']} layers, {a['experts']} experts (I={a['moe_intermediate']}), "
            f"vocab {a['vocab']}; {a['prompts']} prompts × {a['group']} completions × at most {a['new_tokens']} "
            f"tokens a step, {a['steps']} measured steps ({a['device']}). Ours ÷ TRL: step time "
            f"**{d['step_ours_vs_trl']:.2f}** (generate {d['generate_ours_vs_trl']:.2f}, learn "
            f"{d['learn_ours_vs_trl']:.2f}).\n\n{sync}\n\nWeight sync of d={a['sync_dim']}, {a['sync_layers']} layers, "
            f"{a['sync_experts']} experts (LoRA rank {a['rank']}), median of {a['sync_repeats']}: object store ÷ "
            f"memcpy per GB **{d['sync_vs_memcpy']:.2f}** with the store preallocated, "
            f"{d['sync_default_vs_memcpy']:.2f} with Ray's default store")


def rollout(d: dict) -> str:
    rows = [[r["system"], r["switches"], f"{r['steady_p99_ms']:.1f}", f"{r['across_p99_ms']:.1f}",
             f"{r['after_p99_ms']:.1f}",
             f"**{r['added_p99_ms']:.1f}**" if r["system"].startswith("ours") else f"{r['added_p99_ms']:.1f}",
             f"{r['added_across_p99_ms']:.1f}", f"{r['switch_window_ms']:.0f}", f"{r['failed']} / {r['requests']}"]
            for r in d["results"]]
    table = _table(["system", "switches", "p99 steady ms", "p99 across ms", "p99 after ms", "added p99 ms",
                    "added p99, across only ms", "switch window ms (median)", "failed requests"], rows)
    a = d["args"]
    return (f"{table}\n\n{a['clients']} closed-loop clients, {a['max_tokens']}-token completions, one replica; "
            f"\"after\" is the {a['after_s']:.0f} s after each switch. Added p99, ours ÷ Serve redeploy: "
            f"{d['added_vs_peer']:.3f}; target < {d['target_ms']:.0f} ms with no failed request: "
            f"{'met' if d['met'] else 'not met'}")


def quant(d: dict) -> str:
    rows = [[r["variant"], f"{r['perplexity']:.3f}", f"**{r['perplexity_vs_fp32']:.4f}**" if r["variant"] == "int8"
             else f"{r['perplexity_vs_fp32']:.4f}", f"{r['weight_bytes'] / 2**20:.1f}", f"{r['bytes_vs_fp32']:.3f}",
             f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s_vs_fp32']:.3f}", f"{r['of_ceiling']:.2f}"]
            for r in d["results"]]
    table = _table(["weights", "held-out perplexity", "÷ float32", "weight MiB", "÷ float32", "decode tokens/s",
                    "÷ float32", "of bandwidth ceiling"], rows)
    a = d["args"]
    return (f"{table}\n\n{a['steps']} training steps; {a['held_out_texts']} held-out pieces of 600 characters; "
            f"{a['prompts']} prompts × {a['tokens']} tokens decoded together, best of {a['rounds']} rounds, "
            f"{a['threads']} torch threads, device {a['device']} (copy bandwidth "
            f"{d['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s). Target ({d['target']}): {'met' if d['met'] else 'not met'}")


def guidellm(d: dict) -> str:
    rows = []
    for r in d["results"]:
        g, o, k = r["guidellm"], r["ours"], r["ratio"]
        rows.append([f"{r['rate']:g}", f"{g['requests']:g} / {o['requests']:g}",
                     f"{g['prompt_tokens']:g} / {o['prompt_tokens']:g}",
                     f"{g['output_tokens']:g} / {o['output_tokens']:g}",
                     f"{g['mean_latency_s'] * 1e3:.1f} / {o['mean_latency_s'] * 1e3:.1f}", f"{k['mean_latency_s']:.3f}",
                     f"{g['mean_ttft_s'] * 1e3:.1f} / {o['mean_ttft_s'] * 1e3:.1f}", f"{k['mean_ttft_s']:.3f}"])
    table = _table(["rate (req/s)", "requests", "prompt tokens", "output tokens", "mean latency ms",
                    "latency ratio", "mean TTFT ms", "TTFT ratio"], rows)
    a = d["args"]
    return (f"{table}\n\nEach cell: guidellm {d['guidellm_version']} (client) / ours (/metrics); ratios are "
            f"guidellm ÷ ours. {a['requests']} streamed requests per rate, {a['prompt_tokens']} prompt and "
            f"{a['output_tokens']} output tokens. Prompt and output tokens per request agree at every rate: "
            f"{'yes' if d['counts_agree'] else 'no'}")


def kv_cache(d: dict) -> str:
    conc = _table(["KV layout", "KV MiB", "peak sequences", "KV used at peak", "tokens/s", "preemptions"],
                  [[c["layout"], f"{c['kv_cache_bytes'] / 2**20:.0f}", c["peak_running"],
                    f"{c['kv_usage_at_peak']:.0%}", f"{c['tokens_per_s']:.0f}", c["preemptions"]]
                   for c in d["concurrency"]])
    prefix = _table(["prefix caching", "TTFT mean ms", "p50 ms", "p99 ms", "hit rate"],
                    [[p["prefix_caching"], f"{p['ttft_mean_s'] * 1e3:.0f}", f"{p['ttft_p50_s'] * 1e3:.0f}",
                      f"{p['ttft_p99_s'] * 1e3:.0f}", f"{p['hit_rate']:.3f}"] for p in d["prefix"]])
    a, t = d["args"], d["targets"]
    return (f"{conc}\n\nPeak sequences paged ÷ slots: **{d['peak_ratio']:.2f}×** (target ≥ {t['peak_ratio']:g}×: "
            f"{'met' if d['peak_ratio'] >= t['peak_ratio'] else 'not met'}); tokens/s "
            f"{d['tokens_per_s_ratio']:.2f}×. {a['requests']} requests of the mixed trace at once, a KV budget of "
            f"{a['slots']} slot-cache sequences.\n\n{prefix}\n\nMean TTFT without ÷ with prefix caching: "
            f"**{d['ttft_ratio']:.2f}×** (target ≥ {t['ttft_ratio']:g}×: "
            f"{'met' if d['ttft_ratio'] >= t['ttft_ratio'] else 'not met'}). {a['prefix_requests']} requests per "
            f"round at {a['prefix_rate']:g}/s, a {a['system_tokens']}-token system prompt, {a['turn_tokens'][0]}-"
            f"{a['turn_tokens'][1]}-token turns, {a['output_tokens']} output tokens, {a['rounds']} rounds."
            + (f"\n\n{kv_cache_mla(d['mla'])}" if "mla" in d else "")
            + (f"\n\n{kv_cache_window(d['window'])}" if "window" in d else ""))


def kv_cache_window(d: dict) -> str:
    """bench/kv_cache.py --part window: windowed KV memory against every position kept."""
    table = _table(["sliding layers keep", "KV MiB", "peak sequences", "tokens/s", "preemptions"],
                   [["their window" if r["windowed"] else "every position", f"{r['kv_cache_bytes'] / 2**20:.0f}",
                     r["peak_running"], f"{r['tokens_per_s']:.0f}", r["preemptions"]] for r in d["concurrency"]])
    a = d["args"]
    return (f"{table}\n\nPeak sequences windowed ÷ every position kept: **{d['peak_ratio']:.2f}×**; tokens/s "
            f"{d['tokens_per_s_ratio']:.2f}×. {a['requests']} requests at once, prompts of {a['window_prompt'][0]}-"
            f"{a['window_prompt'][1]} tokens (a {a['window']}-token window on every other layer), "
            f"{a['window_output'][0]}-{a['window_output'][1]} output tokens, a KV budget of {a['window_sequences']} "
            f"full-length sequences kept whole.")


def kv_cache_mla(d: dict) -> str:
    """bench/kv_cache.py --part mla: the latent cache against the expanded one."""
    conc = {c["form"]: c for c in d["concurrency"]}
    decode = {c["form"]: c for c in d["decode"]}
    rows = [[form, f"{d['bytes_per_token'][form]:.0f}", d["bytes_per_token_shapes"][form],
             conc[form]["peak_running"], conc[form]["preemptions"], f"{decode[form]['tokens_per_s']:.0f}",
             " / ".join(f"{x:.0f}" for x in decode[form]["rounds"])] for form in ("expanded", "latent")]
    table = _table(["MLA KV cache", "bytes/token", "from the shapes", "peak sequences", "preemptions",
                    "decode tokens/s", "per round"], rows)
    a, t = d["args"], d["targets"]
    return (f"{table}\n\nKV bytes per token expanded ÷ latent: **{d['bytes_ratio']:.2f}×** (the shapes' arithmetic "
            f"gives the same); peak sequences latent ÷ expanded at {d['kv_budget_bytes'] / 2**20:.0f} MiB "
            f"({a['mla_sequences']} full-length expanded sequences): **{d['peak_ratio']:.2f}×**; decode tokens/s "
            f"latent ÷ expanded at {a['decode_batch']} sequences: **{d['decode_ratio']:.2f}×** (target ≥ "
            f"{t['decode_ratio']:g}×: {'met' if d['decode_ratio'] >= t['decode_ratio'] else 'not met'}). "
            f"{a['decode_prompt']}-token prompts, {a['decode_tokens']} tokens each, {a['rounds']} rounds.")


def eval_(d: dict) -> str:
    ours = next(r["best_s"] for r in d["results"] if r["system"] == "ours")
    names = {"ours": "ours (Serve app, HTTP)", "vllm": f"vLLM {d['vllm_version']} OpenAI server (HTTP)",
             "hf": "lm-eval `hf` (transformers, in-process)"}
    table = _table(["system", "best s", "requests/s", "time ÷ ours", "acc", "largest Δ vs hf", "median Δ",
                    "choices with Δ > 1e-4"],
                   [[names[r["system"]], f"{r['best_s']:.2f}", f"{r['requests_per_s']:.1f}",
                     f"{r['best_s'] / ours:.2f}", f"{r['acc']:.3f}", f"{r['max_abs_diff_vs_hf']:.1e}",
                     f"{r['median_abs_diff_vs_hf']:.1e}", r["choices_over_1e-4_vs_hf"]] for r in d["results"]])
    cost = _table(["server", "1-token completions s", "unique prompts s", "+ echo + logprobs s", "scored ÷ plain",
                   "scored ÷ unique"],
                  [[name, f"{c['plain_s']:.2f}", f"{c['plain_unique_s']:.2f}", f"{c['scored_s']:.2f}",
                    f"{c['scored_over_plain']:.2f}", f"{c['scored_over_plain_unique']:.2f}"]
                   for name, c in d["prompt_logprob_cost"].items()])
    a = d["args"]
    return (f"{table}\n\n{d['requests']} log-likelihood requests ({a['docs']} documents × {a['choices']} choices, "
            f"{a['context_tokens']}-token contexts, {a['choice_tokens']}-token choices); lm-eval batch size "
            f"{a['batch_size']}, {a['concurrency']} HTTP requests in flight, {a['threads']} compute threads each; best "
            f"of {a['rounds']} rounds. Time vLLM ÷ ours: **{d['ratios']['vllm_over_ours']:.2f}×**, hf ÷ ours: "
            f"**{d['ratios']['hf_over_ours']:.2f}×**.\n\n{cost}")


def serve_vs_vllm(d: dict) -> str:
    a = d["args"]
    systems = a["systems"].split(",")
    rows = []
    for r in d["results"]:
        for s in systems:
            x = r[s]
            ratio = r.get("ratios", {}).get(s)
            meets = "" if ratio is None else ("yes" if ratio["output_tokens_per_s"] >= d["goal"]["output_tokens_per_s"]
                                              and ratio["ttft_p50_ms"] <= d["goal"]["ttft_p50_ms"]
                                              and ratio["itl_p50_ms"] <= d["goal"]["itl_p50_ms"] else "no")
            rows.append([r["concurrency"], s, f"{x['output_tokens_per_s']:.1f}", f"{x['ttft_p50_ms']:.1f}",
                         f"{x['itl_p50_ms']:.2f}", f"{x['requests']:g}",
                         "–" if ratio is None else f"**{ratio['output_tokens_per_s']:.2f}**",
                         "–" if ratio is None else f"{ratio['ttft_p50_ms']:.2f}",
                         "–" if ratio is None else f"{ratio['itl_p50_ms']:.2f}", meets or "–"])
    table = _table(["concurrency", "server", "output tok/s", "TTFT p50 ms", "ITL p50 ms", "requests",
                    "tok/s ÷ vLLM (goal ≥ 1)", "TTFT ÷ vLLM (≤ 1)", "ITL ÷ vLLM (≤ 1)", "meets the goal"], rows)
    return (f"{table}\n\nguidellm {d['guidellm_version']} ({a['guidellm_workers']} client process), "
            f"{a['prompt_tokens']} prompt and {a['output_tokens']} output tokens, streamed, {a['requests_per_stream']} "
            f"requests per stream (at least 16); each figure the median of {a['rounds']} rounds, the servers "
            f"taking turns")


def serve_path(d: dict) -> str:
    a, probe = d["args"], d["gil_probe"]
    names = {"engine": "engine alone (in-process)", "frontend": "frontend + engine, plain uvicorn",
             "ours": "ours (Serve app)", "vllm": "vLLM's server"}
    rows = []
    for r in d["results"]:
        for s, name in names.items():
            x = r[s]
            rows.append([r["concurrency"], name, f"{x['output_tokens_per_s']:.1f}",
                         f"{x['ttft_p50_ms']:.1f}" if "ttft_p50_ms" in x else "–",
                         f"{x['itl_p50_ms']:.2f}" if "itl_p50_ms" in x else "–",
                         f"**{r['ratios'][s]:.2f}**" if s in r["ratios"] else "–",
                         f"{x['output_tokens_per_s'] / r['engine']['output_tokens_per_s']:.2f}"])
    table = _table(["concurrency", "system", "output tok/s", "TTFT p50 ms", "ITL p50 ms", "tok/s ÷ vLLM's server",
                    "tok/s ÷ engine alone"], rows)
    gil = _table(["engine at concurrency " + str(probe["streams"]), "output tok/s", "÷ alone"],
                 [[b, f"{probe[b]['output_tokens_per_s']:.1f}",
                   "–" if b == "alone" else f"**{probe['ratios'][b]:.2f}**"] for b in ("alone", "thread", "process")])
    return (f"{table}\n\nguidellm {d['guidellm_version']} ({a['guidellm_workers']} client process) drives the three "
            f"servers; {a['prompt_tokens']} prompt and {a['output_tokens']} output tokens, {a['requests_per_stream']} "
            f"requests per stream (at least 16); each figure the median of {a['rounds']} rounds.\n\n{gil}\n\n"
            f"The probe holds the GIL for {a['probe_duty']:.0%} of every 10 ms, in a thread of the engine's process "
            f"(`thread`) or in a process of its own (`process`).")


RENDER = {"moe_layer": moe_layer, "memory": memory, "lora": lora, "layouts": layouts, "checkpoint": checkpoint,
          "ray_overhead": ray_overhead, "goodput": goodput, "serve": serve, "rollout": rollout,
          "quant": quant, "guidellm": guidellm, "kv_cache": kv_cache, "dpo": dpo, "eval": eval_,
          "grpo": grpo, "serve_vs_vllm": serve_vs_vllm, "serve_path": serve_path}


def render(name: str, docs: Path = DOCS) -> str:
    return RENDER[name](json.loads((docs / f"bench_{name}.json").read_text()))


if __name__ == "__main__":
    for name in sys.argv[1:] or RENDER:
        print(f"## {name}\n\n{render(name)}\n")
