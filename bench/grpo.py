"""GRPO against TRL's GRPOTrainer (generation with transformers), on the same model, prompts and steps, and our weight
sync against a plain memcpy of the same bytes, in one run.

Step time: a random Qwen3-MoE saved by transformers (scripts/tiny_chat_model.py), `--prompts` text prompts a step
(slices of a corpus), `--group` completions each of at most `--new-tokens` tokens sampled at temperature 1, a reward
(the share of the completion's characters that are letters), full fine-tuning with AdamW lr 1e-5, gradient clipping
at 1.0, no KL term, the token-mean loss (ours `loss_agg = token_mean`, TRL's `dapo`), the whole step's completions in
one forward and backward, fp32 on the CPU (bf16 on CUDA). Ours: GRPOTrainer with the rollout engine in the learner's
process (`grpo.rollout_workers = 0`: on one machine the same place TRL generates), so the two differ in how they
generate, score and learn, not in where; TRL: GRPOTrainer 1.16 with transformers' `generate`. Each case runs in a
fresh process; a step is timed after one warm-up step, and a case's step time is its fastest measured step (every
one is recorded, with the median and the load average). The breakdown: ours from the step's own metrics
(`generate_seconds`, `score_seconds`, `learn_seconds`, `sync_seconds`); TRL's from its `_generate` and
`_calculate_rewards` (timed around TRL's own methods), the rest of the step being its learning.

Weight sync: a larger model (`--sync-dim`, `--sync-layers`, `--sync-experts`) built with our own code, and one rollout
worker (our engine in a Ray actor on a local Ray, this machine). Full weights: the learner publishes the state once
(one `ray.put` from this process) and the worker swaps it in without a copy (`ray.get` maps the node's shared memory,
`Engine.update_weights` makes the views its parameters); timed from the publish until the worker has them, as
seconds per GB, against `torch.Tensor.copy_` of the same tensors into preallocated ones (one memcpy of the same
bytes: the physical limit of moving them on one node). Adapters only: rank `--rank` LoRA on the attention
projections and experts, published and written into the worker's adapter slot. Each the median of `--sync-repeats`.
The full-weight sync runs twice, each on its own local Ray: with Ray's default object store, which maps its memory
lazily and gives a freed object's pages back, so a publish may first fault in fresh pages (as costly as the copy
itself, or more, on a virtual machine); and with the store preallocated (`RAY_preallocate_plasma_memory=1` and an
object store of 4x the weights), whose pages stay mapped from one publish to the next.

    python bench/grpo.py                       # d=256, 4 layers, 8 experts; 4 prompts x 8 completions x 32 tokens
    python bench/grpo.py --device cuda --dim 1024 --layers 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))

from _output import add_output_args, save_result, subplots  # noqa: E402
from _peak import run_case  # noqa: E402
from _training import SHAKESPEARE, add_shape_args  # noqa: E402

RECORDED = ("dim", "layers", "experts", "moe_intermediate", "vocab", "prompts", "group", "new_tokens", "steps",
            "device", "sync_dim", "sync_layers", "sync_experts", "rank", "sync_repeats")


def letters_reward(row, completion: str) -> float:
    """The share of the completion's characters that are letters (a reward that differs between completions)."""
    return sum(c.isalpha() for c in completion) / max(1, len(completion))


def write_prompts(path: Path, count: int) -> None:
    text = SHAKESPEARE.read_text() if SHAKESPEARE.exists() else Path(argparse.__file__).read_text()
    rows = [{"prompt": "Continue: " + text[(i * 7919) % (len(text) - 200):][:120]} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _ours(args, work: Path) -> dict:
    import torch

    from moe_platform.config import load_config
    from moe_platform.post_train import GRPOTrainer

    n = args.prompts * args.group
    overrides = {
        "run.name": "ours", "run.storage_path": work / "runs", "init.from_hf": work / "model",
        "data.path": work / "prompts.jsonl", "data.val_fraction": 0.0, "train.steps": args.steps + 1,
        "train.global_batch_size": n, "train.micro_batch_size": n, "train.seq_len": 128 + args.new_tokens,
        "train.warmup": 0, "train.lr": 1e-5, "train.min_lr_ratio": 1.0, "train.weight_decay": 0.0,
        "train.grad_clip": 1.0, "train.eval_interval": 0, "checkpoint.interval": 0, "checkpoint.export": "false",
        "train.device": args.device, "lora.enabled": "false", "grpo.group_size": args.group,
        "grpo.max_new_tokens": args.new_tokens, "grpo.reward": "grpo:letters_reward", "grpo.rollout_workers": 0,
        "grpo.rollout_device": args.device, "grpo.rollout_dtype": "bfloat16" if args.device == "cuda" else "float32",
        "grpo.loss_agg": "token_mean", "parallel.dp": 1, "elastic.max_workers": 1,
    }
    cfg = load_config(REPO / "jobs" / "configs" / "grpo.toml", [f"--{k}={v}" for k, v in overrides.items()])
    trainer = GRPOTrainer(cfg, progress=False)
    trainer.setup()
    trainer.train_step()  # warm-up
    steps = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        rec = trainer.train_step()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        steps.append({"step_s": time.perf_counter() - t0, "generate_s": rec["generate_seconds"],
                      "score_s": rec["score_seconds"], "learn_s": rec["learn_seconds"], "sync_s": rec["sync_seconds"],
                      "tokens": rec["response_length"] * n})
    trainer.close_rollouts()
    return {"steps": steps}


def _trl(args, work: Path) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    timers = {"generate_s": 0.0, "score_s": 0.0, "tokens": 0}

    class Timed(GRPOTrainer):
        def _generate(self, prompts):
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            timers["generate_s"] += time.perf_counter() - t0
            timers["tokens"] += sum(len(ids) for ids in out[1])  # completion_ids
            return out

        def _calculate_rewards(self, *a, **kw):
            t0 = time.perf_counter()
            out = super()._calculate_rewards(*a, **kw)
            timers["score_s"] += time.perf_counter() - t0
            return out

    steps: list[dict] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            timers.update(generate_s=0.0, score_s=0.0, tokens=0)
            self.t0 = time.perf_counter()

        def on_step_end(self, _args, state, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            if state.global_step > 1:  # after the warm-up step
                total = time.perf_counter() - self.t0
                steps.append({"step_s": total, "generate_s": timers["generate_s"], "score_s": timers["score_s"],
                              "learn_s": total - timers["generate_s"] - timers["score_s"], "sync_s": 0.0,
                              "tokens": timers["tokens"]})

    n = args.prompts * args.group
    model = transformers.AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    config = GRPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=n, num_generations=args.group,
                        max_completion_length=args.new_tokens, temperature=1.0, beta=0.0, loss_type="dapo",
                        max_steps=args.steps + 1, learning_rate=1e-5, weight_decay=0.0, max_grad_norm=1.0,
                        lr_scheduler_type="constant", warmup_steps=0, bf16=cuda, use_cpu=not cuda, report_to=[],
                        logging_strategy="no", save_strategy="no", dataloader_num_workers=0, seed=0)
    rows = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
    trainer = Timed(model=model, reward_funcs=[lambda prompts, completions, **kw: [letters_reward({}, c)
                                                                                    for c in completions]],
                    args=config, train_dataset=Dataset.from_list(rows),
                    processing_class=transformers.AutoTokenizer.from_pretrained(work / "model"), callbacks=[Clock()])
    trainer.train()
    return {"steps": steps}


def _sync(args) -> dict:
    """Full weights and adapters to one rollout worker on a local Ray, against a memcpy of the same bytes."""
    import ray
    import torch

    from moe_platform.model.args import ModelArgs
    from moe_platform.model.lora import apply_lora
    from moe_platform.model.transformer import build_model
    from moe_platform.post_train.rollout import EngineSpec
    from moe_platform.post_train.rollout_workers import RayRollouts
    from moe_platform.tokenizer import TOKENIZER_FILES, load_tokenizer

    work = Path(args.work)
    vocab = load_tokenizer(work / "model").get_vocab_size()
    margs = ModelArgs(vocab_size=vocab, dim=args.sync_dim, n_layers=args.sync_layers, n_heads=8, n_kv_heads=4,
                      intermediate_size=args.sync_dim, num_experts=args.sync_experts, top_k=2, max_seq_len=256)
    model = build_model(margs, seed=0)
    state = {n: t.detach() for n, t in model.state_dict().items()}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    files = {n: (work / "model" / n).read_bytes() for n in TOKENIZER_FILES if (work / "model" / n).is_file()}
    store = {}
    if args.impl == "sync":  # the preallocated store ("sync_default": Ray's default)
        os.environ["RAY_preallocate_plasma_memory"] = "1"  # read by the object store that ray.init starts below
        store = {"object_store_memory": 4 * nbytes}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, **store)
    try:
        spec = EngineSpec(margs.to_dict(), files, {"max_batch_size": 1, "max_seq_len": 64}, 4, 1.0, 1.0)
        full = RayRollouts(spec, 1, {"CPU": 1}, 600)
        full.start(state, None)
        full_s = []
        for _ in range(args.sync_repeats):
            t0 = time.perf_counter()
            full.sync(state, None)
            full_s.append(time.perf_counter() - t0)
        full.close()
        destinations = {n: torch.empty_like(t) for n, t in state.items()}
        memcpy_s = []
        for _ in range(args.sync_repeats):
            t0 = time.perf_counter()
            for n, t in state.items():
                destinations[n].copy_(t)
            memcpy_s.append(time.perf_counter() - t0)
        del destinations
        apply_lora(model, args.rank, 2.0 * args.rank, 0.0, ("attention", "experts"))
        adapters = {n: t.detach() for n, t in model.state_dict().items() if ".lora." in n}
        adapter_bytes = sum(t.numel() * t.element_size() for t in adapters.values())
        spec.options.update(max_loras=1, max_lora_rank=args.rank, device="cpu")
        spec.adapters = {"rank": args.rank, "scale": 2.0}
        lora = RayRollouts(spec, 1, {"CPU": 1}, 600)
        lora.start(state, adapters)
        adapter_s = []
        for _ in range(args.sync_repeats):
            t0 = time.perf_counter()
            lora.sync(None, adapters)
            adapter_s.append(time.perf_counter() - t0)
        lora.close()
    finally:
        ray.shutdown()
    gb = nbytes / 1e9
    return {"bytes": nbytes, "full_s": full_s, "memcpy_s": memcpy_s, "adapter_bytes": adapter_bytes,
            "adapter_s": adapter_s, "full_s_per_gb": statistics.median(full_s) / gb,
            "memcpy_s_per_gb": statistics.median(memcpy_s) / gb, "adapter_sync_s": statistics.median(adapter_s)}


def _worker(args) -> dict:
    import torch

    torch.manual_seed(0)
    if args.impl in ("sync", "sync_default"):
        return _sync(args)
    steps = (_ours if args.impl == "ours" else _trl)(args, Path(args.work))["steps"]
    fastest = min(steps, key=lambda s: s["step_s"])
    return {"impl": args.impl, **{k: fastest[k] for k in ("step_s", "generate_s", "score_s", "learn_s", "sync_s")},
            "step_median_s": statistics.median(s["step_s"] for s in steps), "steps": steps,
            "tokens_per_step": statistics.mean(s["tokens"] for s in steps)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p, dim=256, layers=4, experts=8, moe_intermediate=256, vocab=2048)
    p.add_argument("--prompts", type=int, default=4, help="prompts a step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens a completion may have")
    p.add_argument("--steps", type=int, default=8, help="measured steps per case (after one warm-up step)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sync-dim", type=int, default=768, help="model width of the weight-sync case")
    p.add_argument("--sync-layers", type=int, default=6)
    p.add_argument("--sync-experts", type=int, default=16)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the adapter-only sync")
    p.add_argument("--sync-repeats", type=int, default=5)
    add_output_args(p, "grpo")
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.impl:  # one case, in its own process
        print(json.dumps(_worker(args)))
        return 0
    from tiny_chat_model import build

    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        work = Path(tmp)
        build(work / "model", work / "chat.jsonl", rows=200, hidden=args.dim, layers=args.layers,
              experts=args.experts, moe_intermediate=args.moe_intermediate, vocab=args.vocab, max_len=512)
        write_prompts(work / "prompts.jsonl", args.prompts * (args.steps + 1))
        results = {}
        for impl in ("ours", "trl", "sync", "sync_default"):
            argv = [*(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in RECORDED), f"--impl={impl}",
                    f"--work={work}"]
            load = os.getloadavg()[0]
            results[impl] = {**run_case(__file__, argv, impl, for_memory=False), "load_1m": [load, os.getloadavg()[0]]}
            r = results[impl]
            if impl.startswith("sync"):
                store = "preallocated" if impl == "sync" else "Ray's default"
                print(f"sync ({store} object store): {r['bytes'] / 2**20:.0f} MiB in "
                      f"{statistics.median(r['full_s']):.3f} s "
                      f"({r['full_s_per_gb']:.3f} s/GB; memcpy {r['memcpy_s_per_gb']:.3f} s/GB); adapters "
                      f"{r['adapter_bytes'] / 2**20:.1f} MiB in {r['adapter_sync_s'] * 1e3:.1f} ms", flush=True)
            else:
                print(f"{impl:>4}: step {r['step_s']:.3f} s (generate {r['generate_s']:.3f}, score "
                      f"{r['score_s']:.4f}, learn {r['learn_s']:.3f}, sync {r['sync_s']:.4f}); "
                      f"{r['tokens_per_step']:.0f} completion tokens a step", flush=True)
    ours, trl, sync = results["ours"], results["trl"], results["sync"]
    summary = {"step_ours_vs_trl": ours["step_s"] / trl["step_s"],
               "generate_ours_vs_trl": ours["generate_s"] / trl["generate_s"],
               "learn_ours_vs_trl": ours["learn_s"] / trl["learn_s"],
               "sync_vs_memcpy": sync["full_s_per_gb"] / sync["memcpy_s_per_gb"],
               "sync_default_vs_memcpy": results["sync_default"]["full_s_per_gb"] / sync["memcpy_s_per_gb"]}
    print(f"GRPO, ours ÷ TRL: step time {summary['step_ours_vs_trl']:.2f} (generate "
          f"{summary['generate_ours_vs_trl']:.2f}, learn {summary['learn_ours_vs_trl']:.2f}); weight sync ÷ memcpy "
          f"per GB {summary['sync_vs_memcpy']:.2f} (preallocated object store; Ray's default: "
          f"{summary['sync_default_vs_memcpy']:.2f})")
    save_result({"args": {k: getattr(args, k) for k in RECORDED}, "ours": ours, "trl": trl, "sync": sync,
                 "sync_default": results["sync_default"], **summary},
                args.out_json, args.out_png, plot)
    return 0


def plot(result: dict):
    a = result["args"]
    fig, axes = subplots(1, 2, figsize=(11, 4))
    parts = ("generate_s", "score_s", "learn_s", "sync_s")
    names = ("generate", "score", "learn", "sync")
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for i, impl in enumerate(("ours", "trl")):
        bottom = 0.0
        for part, name, color in zip(parts, names, colors, strict=True):
            value = result[impl][part]
            axes[0].bar(i, value, bottom=bottom, color=color, label=name if i == 0 else None)
            bottom += value
    axes[0].set_xticks([0, 1], ["ours\n(our engine)", "TRL\n(transformers generate)"])
    axes[0].set_ylabel(f"step time, s ({a['device']})")
    axes[0].legend()
    axes[0].set_title(f"{a['prompts']} prompts x {a['group']} completions x {a['new_tokens']} tokens")
    s = result["sync"]
    axes[1].bar(["sync, preallocated\nobject store", "sync, Ray's default\nobject store", "memcpy\n(same bytes)"],
                [s["full_s_per_gb"], result["sync_default"]["full_s_per_gb"], s["memcpy_s_per_gb"]],
                color=["tab:green", "tab:olive", "tab:gray"])
    axes[1].set_ylabel("seconds per GB")
    axes[1].set_title(f"{s['bytes'] / 2**20:.0f} MiB of weights; adapters only: {s['adapter_sync_s'] * 1e3:.0f} ms")
    fig.suptitle(f"GRPO vs TRL GRPOTrainer, d={a['dim']} L={a['layers']} E={a['experts']}; weight sync to a rollout "
                 f"worker")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
