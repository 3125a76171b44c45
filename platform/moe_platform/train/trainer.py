"""The training loop of one process: tokenizer and data, model, AdamW, exact resume, metrics, checkpoints, export.

Resume is the default path: a run whose directory holds a committed checkpoint continues from it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moe_platform.checkpoint import latest_checkpoint
from moe_platform.checkpoint.hf import export_hf
from moe_platform.config import Config, config_to_dict
from moe_platform.model.args import ModelArgs
from moe_platform.model.moe import update_routing_biases
from moe_platform.model.transformer import MoETransformer, build_model
from moe_platform.train.checkpointing import AsyncCheckpointer, load_training_state, take_snapshot
from moe_platform.train.data import DataSampler, build_token_dataset, iter_documents
from moe_platform.train.metrics import MetricsLog, matmul_peak_flops, write_loss_curve
from moe_platform.train.optim import build_optimizer, lr_at, set_lr
from moe_platform.train.tokenizer import eos_id, load_tokenizer, save_tokenizer, train_tokenizer

log = logging.getLogger("moe_platform.train")


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    final_loss: float
    export_dir: Path | None
    resumed_from: int | None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_tokenizer(cfg: Config, run_dir: Path):
    """Load the run's tokenizer, or train one on the corpus the first time (it is then fixed for the run)."""
    tok_dir = run_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        return load_tokenizer(tok_dir), tok_dir
    docs = iter_documents(cfg.data.path, cfg.data.text_column, cfg.data.max_bytes)
    tok = train_tokenizer(docs, cfg.data.vocab_size)
    tmp = run_dir / f".tokenizer-{os.getpid()}"
    save_tokenizer(tok, tmp)
    os.replace(tmp, tok_dir)
    return tok, tok_dir


class Trainer:
    def __init__(self, cfg: Config, progress: bool = True):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.storage_path).expanduser() / cfg.run.name
        self.device = resolve_device(cfg.train.device)
        self.progress = progress
        prec = cfg.train.precision
        self.autocast_dtype = (torch.bfloat16 if prec == "bf16" or (prec == "auto" and self.device.type == "cuda")
                               else None)
        self.step = 0
        self.resumed_from: int | None = None

    # -- set-up -------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"run.storage_path {cfg.run.storage_path!r} is not writable: {e}") from e
        if cfg.train.deterministic and self.device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        self.tokenizer, self.tokenizer_dir = prepare_tokenizer(cfg, self.run_dir)
        self.eos_id = eos_id(self.tokenizer)
        self.dataset = build_token_dataset(cfg.data, self.tokenizer, cfg.train.seq_len,
                                           Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else None)
        self.sampler = DataSampler(self.dataset.train_ids_count, cfg.train.global_batch_size, cfg.train.seed)
        margs = ModelArgs.from_dict({**cfg.model.to_dict(), "vocab_size": self.tokenizer.get_vocab_size()})
        self.model_args = margs
        self.model: MoETransformer = build_model(margs, device=self.device, seed=cfg.train.seed)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.moe_layers = self.model.moe_layers()
        self.accum = cfg.train.global_batch_size // cfg.train.micro_batch_size
        for moe in self.moe_layers:
            moe.aux_loss_scale = 1.0 / self.accum
        self.checkpointer = AsyncCheckpointer(self.run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.flops_per_token = margs.flops_per_token(cfg.train.seq_len)
        self.peak_flops = matmul_peak_flops(self.device)
        seed_everything(cfg.train.seed)
        self._resume()

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            self.metrics.truncate_after(0)
            return
        saved = json.loads((ckpt / "trainer.json").read_text())
        if saved["model_args"] != self.model_args.to_dict():
            diff = {k: (v, self.model_args.to_dict().get(k)) for k, v in saved["model_args"].items()
                    if self.model_args.to_dict().get(k) != v}
            raise ValueError(f"checkpoint {ckpt} was written by a different model config (saved, now): {diff}; "
                             f"use another run.name or storage_path to start a new run")
        state = load_training_state(ckpt, self.model, self.optimizer)
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        self.resumed_from = self.step
        self.metrics.truncate_after(self.step)
        log.info("resumed from %s at step %d", ckpt, self.step)

    # -- training ------------------------------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "sampler": self.sampler.state_dict(), "model_args": self.model_args.to_dict(),
                "config": config_to_dict(self.cfg), "lr_schedule": {"kind": "warmup_cosine", "step": self.step}}

    def loss_fn(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits = self.model(tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg.train
        t0 = time.perf_counter()
        self.model.train()
        lr = lr_at(self.step, cfg)
        set_lr(self.optimizer, lr)
        ids = self.sampler.next_global_batch()
        total_loss = torch.zeros((), device=self.device)
        aux_total = 0.0
        loads = torch.zeros(len(self.moe_layers), self.model_args.num_experts, device=self.device)
        for micro in self.sampler.micro_batches(ids, cfg.micro_batch_size):
            tokens, targets = (t.to(self.device, non_blocking=True) for t in self.dataset.get(micro))
            loss = self.loss_fn(tokens, targets) / self.accum
            loss.backward()
            total_loss += loss.detach()
            aux_total += sum(float(m.last_aux_loss) for m in self.moe_layers) / self.accum
            loads += torch.stack([m.last_tokens_per_expert.float() for m in self.moe_layers])
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                     if cfg.grad_clip > 0 else torch.zeros(()))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_routing_biases(self.moe_layers, self.model_args.bias_update_rate)
        self.step += 1
        dt = time.perf_counter() - t0
        tokens_per_s = len(ids) * cfg.seq_len / dt
        rec = {
            "step": self.step, "loss": float(total_loss), "aux_loss": aux_total, "lr": lr,
            "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / self.peak_flops,
            "expert_imbalance": float((loads.max(dim=1).values / loads.mean(dim=1).clamp(min=1)).mean()),
            "tokens_per_expert": loads.sum(0).tolist(), "step_time_s": dt,
        }
        if cfg.log_sample_ids:
            rec["sample_ids"] = ids.tolist()
        return rec

    @torch.no_grad()
    def evaluate(self, max_batches: int = 8) -> float | None:
        val = self.dataset.val_ids()
        if len(val) == 0:
            return None
        self.model.eval()
        losses = []
        mbs = self.cfg.train.micro_batch_size
        for i in range(0, min(len(val), max_batches * mbs), mbs):
            tokens, targets = (t.to(self.device) for t in self.dataset.get(val[i:i + mbs]))
            losses.append(float(self.loss_fn(tokens, targets)))
        return sum(losses) / len(losses)

    def save_checkpoint(self, blocking: bool = False) -> None:
        self.checkpointer.save(lambda: take_snapshot(self.step, self.model, self.optimizer, self.trainer_state(),
                                                     self.tokenizer_dir, meta={"world_size": 1}), blocking=blocking)

    def export(self, out_dir: Path) -> Path:
        return export_hf(self.model.state_dict(), self.model_args, out_dir, self.tokenizer_dir, eos_id=self.eos_id)

    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to train.steps; `stop_after` ends early at that step (checkpointed) as a planned interruption."""
        cfg = self.cfg
        total = cfg.train.steps if stop_after is None else min(stop_after, cfg.train.steps)
        bar = tqdm(total=total, initial=self.step, desc=f"train {cfg.run.name}", disable=not self.progress,
                   dynamic_ncols=True)
        rec: dict[str, Any] = {"loss": float("nan")}
        while self.step < total:
            rec = self.train_step()
            if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0:
                rec["val_loss"] = self.evaluate()
            if self.step % cfg.train.log_interval == 0 or self.step == total:
                self.metrics.append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0 and self.step < total:
                self.save_checkpoint()
        bar.close()
        if self.resumed_from != self.step:
            self.save_checkpoint(blocking=True)
        self.checkpointer.wait()
        if self.step < cfg.train.steps:
            return TrainResult(self.run_dir, self.step, rec["loss"], None, self.resumed_from)
        val = self.evaluate()
        export_dir = self.export(self.run_dir / "export") if cfg.checkpoint.export else None
        write_loss_curve(self.metrics.path, self.run_dir / "loss.png", title=cfg.run.name)
        summary = {"final_step": self.step, "final_loss": rec["loss"], "val_loss": val,
                   "resumed_from": self.resumed_from, "export": str(export_dir) if export_dir else None}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return TrainResult(self.run_dir, self.step, rec["loss"], export_dir, self.resumed_from)


def train(cfg: Config, progress: bool = True) -> TrainResult:
    trainer = Trainer(cfg, progress=progress)
    trainer.setup()
    return trainer.fit()
