"""LoRA fine-tuning against full fine-tuning of the same imported model, in one run: trainable parameters,
optimizer-state bytes, peak memory and step time.

The model is a random Qwen3-MoE saved by transformers (ChatML tokenizer, chat data of scripts/tiny_chat_model.py),
imported with `init.from_hf` and trained with our trainer on one process (the same layout for every case):
- full fine-tuning (every weight trains, AdamW state for all of them);
- LoRA rank 16 on the attention projections (`lora.targets = q_proj,k_proj,v_proj,o_proj`);
- LoRA rank 16 on the attention projections and the routed experts (`...,experts`).
The peer is transformers + peft on the same model directory: `get_peft_model` with the same rank, alpha and
attention targets, torch AdamW, a batch of the same shape. Each case runs in its own process; peak memory is the
process's peak resident set over the measured steps (weights included), on CUDA the allocator's peak.

    python bench/lora.py                       # d=256, 8 layers, 8 experts, rank 16, batch 8 x 256 tokens
    python bench/lora.py --device cuda --dim 1024 --layers 16
"""

from __future__ import annotations

import argparse
import json
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
from _training import add_shape_args  # noqa: E402

ATTENTION = "q_proj,k_proj,v_proj,o_proj"
CASES = [("ours", "full", ""), ("ours", "lora", ATTENTION), ("ours", "lora", ATTENTION + ",experts"),
         ("peft", "lora", ATTENTION)]
# the options each case process is given, and the args recorded in the JSON
RECORDED = ("dim", "layers", "experts", "moe_intermediate", "vocab", "rank", "batch", "seq", "steps", "device")


def _state_bytes(optimizer) -> int:
    import torch

    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t) and t.dim() > 0)


def _ours(args, work: Path) -> tuple:
    from moe_platform.config import load_config
    from moe_platform.train.trainer import Trainer

    overrides = {
        "run.name": f"{args.mode}-{args.targets or 'all'}".replace(",", "-"), "run.storage_path": work / "runs",
        "init.from_hf": work / "model", "data.path": work / "chat.jsonl", "data.cache_dir": work / "cache",
        "data.val_fraction": 0.0, "data.truncation": "truncate", "train.steps": args.steps + 1,
        "train.global_batch_size": args.batch,
        "train.micro_batch_size": args.batch, "train.seq_len": args.seq, "train.warmup": 1, "train.lr": 1e-4,
        "train.eval_interval": 0, "checkpoint.interval": 0, "checkpoint.export": "false",
        "parallel.dp": 1, "train.device": args.device,
    }
    if args.mode == "lora":
        overrides.update({"lora.enabled": "true", "lora.rank": args.rank, "lora.alpha": 2.0 * args.rank,
                          "lora.targets": args.targets})
    cfg = load_config(REPO / "jobs" / "configs" / "finetune.toml", [f"--{k}={v}" for k, v in overrides.items()])
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    return trainer.model, trainer.backend.optimizer, trainer.train_step


def _peft(args, work: Path) -> tuple:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    device = torch.device(args.device)
    base = transformers.AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32).to(device)
    model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank, lora_dropout=0.0,
                                            target_modules=args.targets.split(","))).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    vocab = base.config.vocab_size
    tokens = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)

    def step():
        loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1], use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, optimizer, step


def _worker(args) -> dict:
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    model, optimizer, step = (_ours if args.impl == "ours" else _peft)(args, Path(args.work))
    step()  # warm-up: optimizer state and gradient buffers allocated
    reset_peak(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"impl": args.impl, "mode": args.mode, "targets": args.targets, "step_s": statistics.median(times),
            "peak_bytes": peak_bytes(device), "optimizer_state_bytes": _state_bytes(optimizer),
            "trainable_params": trainable, "params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p, dim=256, layers=8, experts=8, moe_intermediate=256, vocab=2048, batch=8, seq=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="measured steps per case (after one warm-up step)")
    p.add_argument("--device", default="cpu")
    add_output_args(p, "lora")
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--targets", default="", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.impl:  # one case, in its own process
        print(json.dumps(_worker(args)))
        return 0
    from tiny_chat_model import build

    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        work = Path(tmp)
        build(work / "model", work / "chat.jsonl", rows=2000, hidden=args.dim, layers=args.layers,
              experts=args.experts, moe_intermediate=args.moe_intermediate, vocab=args.vocab,
              max_len=max(512, args.seq + 1))
        results = []
        for impl, mode, targets in CASES:
            argv = [*(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in RECORDED), f"--impl={impl}",
                    f"--mode={mode}", f"--targets={targets}", f"--work={work}"]
            r = run_case(__file__, argv, f"{impl} {mode} {targets}")
            results.append(r)
            print(f"{impl:>5} {mode:>4} {targets or 'all weights':<34}: {r['trainable_params']:>10,} trainable, "
                  f"optimizer state {r['optimizer_state_bytes'] / 2**20:8.2f} MiB, peak {r['peak_bytes'] / 2**20:7.1f}"
                  f" MiB, step {r['step_s']:.3f} s", flush=True)
    full = results[0]
    for r in results:
        r.update(state_vs_full=r["optimizer_state_bytes"] / full["optimizer_state_bytes"],
                 peak_vs_full=r["peak_bytes"] / full["peak_bytes"], time_vs_full=r["step_s"] / full["step_s"])
    ours_attn, ours_experts, peft = results[1], results[2], results[3]
    summary = {"lora_state_vs_full": ours_attn["state_vs_full"],
               "lora_experts_state_vs_full": ours_experts["state_vs_full"],
               "lora_step_vs_peft": ours_attn["step_s"] / peft["step_s"],
               "lora_peak_vs_peft": ours_attn["peak_bytes"] / peft["peak_bytes"],
               "lora_state_vs_peft": ours_attn["optimizer_state_bytes"] / peft["optimizer_state_bytes"]}
    print(f"optimizer state ÷ full fine-tuning at rank {args.rank}: attention {summary['lora_state_vs_full']:.4f}, "
          f"attention + experts {summary['lora_experts_state_vs_full']:.4f} (target <= 0.05); ours ÷ peft (attention "
          f"LoRA): step time {summary['lora_step_vs_peft']:.2f}, peak {summary['lora_peak_vs_peft']:.2f}")
    save_result({"args": {k: getattr(args, k) for k in RECORDED}, "results": results, **summary}, args.out_json,
                args.out_png, plot)
    return 0


def plot(result: dict):
    results, a = result["results"], result["args"]
    fig, axes = subplots(1, 2, figsize=(10, 3.8))
    kinds = ["attention + experts" if "experts" in r["targets"] else "attention" if r["targets"] else "all weights"
             for r in results]
    labels = [f"{r['impl']} {r['mode']}\n{kind}" for r, kind in zip(results, kinds, strict=True)]
    colors = ["tab:green" if r["impl"] == "ours" else "tab:gray" for r in results]
    axes[0].bar(labels, [r["optimizer_state_bytes"] / 2**20 for r in results], color=colors)
    axes[0].set_ylabel("optimizer state, MiB")
    axes[0].set_yscale("log")
    axes[1].bar(labels, [r["peak_bytes"] / 2**20 for r in results], color=colors)
    axes[1].set_ylabel(f"peak memory, MiB ({a['device']})")
    fig.suptitle(f"LoRA rank {a['rank']} vs full fine-tuning, d={a['dim']} L={a['layers']} E={a['experts']}, "
                 f"{a['batch']}x{a['seq']} tokens")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
