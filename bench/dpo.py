"""LoRA DPO against TRL's DPOTrainer on transformers + peft, on the same model and preference pairs, in one run: step
time, and peak memory with the base model as the reference (adapters switched off) against a separate reference copy.

The model is a random Qwen3-MoE saved by transformers (scripts/tiny_chat_model.py: ChatML tokenizer and template);
the pairs are TRL's conversational format, a prompt and two long responses (slices of a text corpus), every sequence
cut to the same length (ours: data.truncation = truncate at train.seq_len + 1 tokens; TRL: max_length, keep_start),
so both sides train on batches of the same shape. Four cases, each in a fresh process, one process each:
- ours: DPOTrainer (`train.objective = dpo`), LoRA on the attention projections, `dpo.reference = base` (the base
  with the adapters off) and `dpo.reference = <the same model directory>` (a frozen copy of every base weight);
- TRL: DPOTrainer with a peft LoraConfig of the same rank, alpha and targets, `ref_model=None` (TRL disables the
  adapter for the reference) and `ref_model=<the model loaded again>` (a separate copy).
Both: sigmoid loss, beta 0.1, AdamW lr 1e-4 without weight decay, gradient clipping at 1.0, the reference's
log-probabilities computed every step (TRL's precompute_ref_log_probs off), no activation checkpointing, fp32 on CPU
(bf16 on CUDA). A step is one optimizer step over `--pairs` pairs (2 x pairs sequences), timed after a warm-up step
(TRL: from its step-begin to its step-end callback; ours: `train_step`); a case's step time is its fastest measured
step (every one is recorded, with the median and the machine's load average before and after the case: on a machine
shared with other work, the slower steps measure that work too); peak memory is the process's peak resident
set over the measured steps, weights included (on CUDA the allocator's peak), measured in a second process of the
case in which glibc maps every large block on its own (exact, but it slows steps: bench/_peak.py).

    python bench/dpo.py                        # d=256, 8 layers, 8 experts, rank 16, 4 pairs x 256 tokens
    python bench/dpo.py --device cuda --dim 1024 --layers 16
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
from _peak import peak_bytes, reset_peak, run_case  # noqa: E402
from _training import SHAKESPEARE, add_shape_args  # noqa: E402

ATTENTION = "q_proj,k_proj,v_proj,o_proj"
CASES = [("ours", "base"), ("ours", "copy"), ("trl", "base"), ("trl", "copy")]
RECORDED = ("dim", "layers", "experts", "moe_intermediate", "vocab", "rank", "pairs", "seq", "steps", "device")


def write_pairs(path: Path, count: int) -> None:
    """`count` pairs: a prompt quoting the corpus, and two long responses (other slices of it)."""
    text = SHAKESPEARE.read_text() if SHAKESPEARE.exists() else Path(argparse.__file__).read_text()
    rows = []
    for i in range(count):
        at = (i * 7919) % (len(text) - 4000)
        prompt = [{"role": "user", "content": "Continue this text: " + text[at:at + 200]}]
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": text[at + 200:at + 2200]}],
                     "rejected": [{"role": "assistant", "content": text[at + 2200:at + 4000]}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _ours(args, work: Path):
    from moe_platform.config import load_config
    from moe_platform.post_train import DPOTrainer

    overrides = {
        "run.name": f"ours-{args.reference}", "run.storage_path": work / "runs", "init.from_hf": work / "model",
        "data.path": work / "pairs.jsonl", "data.cache_dir": work / "cache", "data.val_fraction": 0.0,
        "data.truncation": "truncate", "train.steps": args.steps + 1, "train.global_batch_size": args.pairs,
        "train.micro_batch_size": args.pairs, "train.seq_len": args.seq, "train.warmup": 0, "train.lr": 1e-4,
        "train.weight_decay": 0.0, "train.grad_clip": 1.0, "train.eval_interval": 0, "checkpoint.interval": 0,
        "checkpoint.export": "false", "train.device": args.device, "lora.rank": args.rank,
        "lora.alpha": 2.0 * args.rank, "lora.targets": ATTENTION, "dpo.beta": 0.1, "dpo.loss_type": "sigmoid",
        "dpo.reference": "base" if args.reference == "base" else work / "model",
        "parallel.dp": 1, "parallel.tp": 1, "parallel.pp": 1, "parallel.ep": 1, "elastic.max_workers": 1,
    }
    cfg = load_config(REPO / "jobs" / "configs" / "dpo.toml", [f"--{k}={v}" for k, v in overrides.items()])
    trainer = DPOTrainer(cfg, progress=False)
    trainer.setup()
    device = trainer.device
    times: list[float] = []
    trainer.train_step()  # warm-up: optimizer state and gradient buffers allocated
    reset_peak(device)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainer.train_step()
        if device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    model = trainer.model
    return times, sum(p.numel() for p in model.parameters() if p.requires_grad), trainer.reference.copied_numel


def _trl(args, work: Path):
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = transformers.AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    reference = (transformers.AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
                 if args.reference == "copy" else None)
    times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, _args, state, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            if state.global_step == 1:  # after the warm-up step
                reset_peak(device)
            else:
                times.append(time.perf_counter() - self.t0)

    config = DPOConfig(output_dir=str(work / f"trl-{args.reference}"), per_device_train_batch_size=args.pairs,
                       max_steps=args.steps + 1, learning_rate=1e-4, weight_decay=0.0, max_grad_norm=1.0,
                       lr_scheduler_type="constant", warmup_steps=0, beta=0.1, loss_type=["sigmoid"],
                       max_length=args.seq + 1, truncation_mode="keep_start", precompute_ref_log_probs=False,
                       gradient_checkpointing=False, bf16=cuda, use_cpu=not cuda, report_to=[],
                       logging_strategy="no", save_strategy="no", dataloader_num_workers=0, seed=0)
    trainer = DPOTrainer(model=model, ref_model=reference, args=config,
                         train_dataset=Dataset.from_list([json.loads(line) for line in
                                                          (work / "pairs.jsonl").read_text().splitlines()]),
                         processing_class=transformers.AutoTokenizer.from_pretrained(work / "model"),
                         peft_config=LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank, lora_dropout=0.0,
                                                target_modules=ATTENTION.split(",")),
                         callbacks=[Clock()])
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    copied = sum(p.numel() for p in reference.parameters()) if reference is not None else 0
    return times, trainable, copied


def _worker(args) -> dict:
    import torch

    torch.manual_seed(0)
    times, trainable, copied = (_ours if args.impl == "ours" else _trl)(args, Path(args.work))
    # The fastest measured step: on a machine shared with other work the slower ones measure that work too.
    return {"impl": args.impl, "reference": args.reference, "step_s": min(times),
            "step_median_s": statistics.median(times), "step_times": times,
            "peak_bytes": peak_bytes(torch.device(args.device)), "trainable_params": trainable,
            "reference_copy_params": copied}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p, dim=256, layers=8, experts=8, moe_intermediate=256, vocab=2048, seq=256)
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step (two sequences each)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="measured steps per case (after one warm-up step)")
    p.add_argument("--device", default="cpu")
    add_output_args(p, "dpo")
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--reference", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.impl:  # one case, in its own process
        print(json.dumps(_worker(args)))
        return 0
    from tiny_chat_model import build

    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        work = Path(tmp)
        build(work / "model", work / "chat.jsonl", rows=200, hidden=args.dim, layers=args.layers,
              experts=args.experts, moe_intermediate=args.moe_intermediate, vocab=args.vocab,
              max_len=max(512, args.seq + 1))
        write_pairs(work / "pairs.jsonl", args.pairs * (args.steps + 1) * 2)
        results = []
        for impl, reference in CASES:
            argv = [*(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in RECORDED), f"--impl={impl}",
                    f"--reference={reference}", f"--work={work}"]
            load = os.getloadavg()[0]  # recorded: another process on the machine moves the step times
            timed = run_case(__file__, argv, f"{impl} reference={reference}", for_memory=False)
            r = run_case(__file__, argv, f"{impl} reference={reference}")  # exact resident set, slower steps
            r.update(step_s=timed["step_s"], step_median_s=timed["step_median_s"], step_times=timed["step_times"],
                     load_1m=[load, os.getloadavg()[0]])
            results.append(r)
            print(f"{impl:>4} reference {reference:<4}: peak {r['peak_bytes'] / 2**20:7.1f} MiB, step "
                  f"{r['step_s']:.3f} s, {r['trainable_params']:,} trainable, reference copy "
                  f"{r['reference_copy_params']:,} params", flush=True)
    ours, ours_copy, trl, trl_copy = results
    summary = {"step_ours_vs_trl": ours["step_s"] / trl["step_s"],
               "peak_ours_vs_trl": ours["peak_bytes"] / trl["peak_bytes"],
               "ours_base_vs_copy_peak": ours["peak_bytes"] / ours_copy["peak_bytes"],
               "trl_base_vs_copy_peak": trl["peak_bytes"] / trl_copy["peak_bytes"],
               "copy_step_ours_vs_trl": ours_copy["step_s"] / trl_copy["step_s"],
               "copy_peak_ours_vs_trl": ours_copy["peak_bytes"] / trl_copy["peak_bytes"]}
    print(f"LoRA DPO, the base as reference, ours ÷ TRL: step time {summary['step_ours_vs_trl']:.2f}, peak memory "
          f"{summary['peak_ours_vs_trl']:.2f}; peak with the base as reference ÷ with a separate copy: ours "
          f"{summary['ours_base_vs_copy_peak']:.3f}, TRL {summary['trl_base_vs_copy_peak']:.3f}")
    save_result({"args": {k: getattr(args, k) for k in RECORDED}, "results": results, **summary}, args.out_json,
                args.out_png, plot)
    return 0


def plot(result: dict):
    results, a = result["results"], result["args"]
    fig, axes = subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['impl']}\n{'base as ref.' if r['reference'] == 'base' else 'ref. copy'}" for r in results]
    colors = ["tab:green" if r["impl"] == "ours" else "tab:gray" for r in results]
    axes[0].bar(labels, [r["step_s"] for r in results], color=colors)
    axes[0].set_ylabel(f"step time, s ({a['device']})")
    axes[1].bar(labels, [r["peak_bytes"] / 2**20 for r in results], color=colors)
    axes[1].set_ylabel(f"peak memory, MiB ({a['device']})")
    fig.suptitle(f"LoRA DPO (rank {a['rank']}) vs TRL + peft, d={a['dim']} L={a['layers']} E={a['experts']}, "
                 f"{a['pairs']} pairs x {a['seq']} tokens a step")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
