"""The training loop of one rank: tokenizer and data, model on its layout, exact resume, metrics, checkpoints, export.

Resume is the default path: a run whose directory holds a committed checkpoint continues from it, whatever layout
wrote it. On one process the loop runs plain PyTorch; on several it runs the same model on DeepSpeed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from moe_platform.checkpoint.export import export_checkpoint
from moe_platform.checkpoint.files import check_writable
from moe_platform.checkpoint.hf import HFWeights, read_model_args
from moe_platform.checkpoint.remote import RemoteRun, is_uri, mirror_dir
from moe_platform.checkpoint.sharded import ShardedReader
from moe_platform.config import Config, config_to_dict
from moe_platform.model.args import ModelArgs
from moe_platform.model.lora import apply_lora, init_adapters, is_lora_name, lora_a_init, parse_targets
from moe_platform.model.moe import update_routing_biases
from moe_platform.model.transformer import build_model
from moe_platform.parallel import parallelize_model, resolve_layout
from moe_platform.parallel.comm import any_rank, collective_device
from moe_platform.parallel.layout import Layout, ProcessGroups, build_process_groups
from moe_platform.tokenizer import (
    TOKENIZER_FILES,
    ChatTemplate,
    load_tokenizer,
    model_stop_ids,
    save_tokenizer,
    train_tokenizer,
)
from moe_platform.train.backends import DeepSpeedBackend, LocalBackend, TokenLoss
from moe_platform.train.chat_data import build_chat_dataset, iter_chat_texts
from moe_platform.train.checkpointing import (
    AsyncCheckpointer,
    read_trainer_state,
    restore_rank_rng,
    take_snapshot,
)
from moe_platform.train.data import DataSampler, build_token_dataset, iter_documents
from moe_platform.train.metrics import MetricsLog, matmul_peak_flops, write_loss_curve
from moe_platform.train.optim import lr_at

log = logging.getLogger("moe_platform.train")


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    final_loss: float
    export_dir: Path | None
    resumed_from: int | None
    layout: str = "dp1·tp1·pp1·ep1"
    preempted: bool = False


@dataclass
class TrainerHooks:
    """Where a launcher plugs in (Ray Train reports metrics and checkpoints, and watches for preemption)."""

    on_step: Callable[[dict[str, Any]], None] | None = None  # every rank, after each step, with the step's metrics
    on_checkpoint: Callable[[Path | None, int], None] | None = None  # every rank, after a commit (the dir on rank 0)
    preemption_requested: Callable[[], bool] | None = None  # polled each step; any rank saying yes stops all
    on_export: Callable[[Path, int], None] | None = None  # rank 0, after the final export (dir, step): e.g. publish


@dataclass
class DistContext:
    """Where this process sits: torch.distributed is already initialised when world_size > 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device = 'cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_tokenizer(cfg: Config, run_dir: Path):
    """Load the run's tokenizer; the first time, copy the imported model's (init.from_hf) as it is, or train one on
    the corpus. It is then fixed for the run (checkpoints and the export carry it)."""
    tok_dir = run_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        return load_tokenizer(tok_dir), tok_dir
    tmp = run_dir / f".tokenizer-{os.getpid()}"
    if cfg.init.from_hf:
        source = Path(cfg.init.from_hf)
        load_tokenizer(source)  # a clear error when the model directory has no tokenizer.json
        tmp.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
    else:
        docs = (iter_chat_texts(cfg.data) if cfg.data.format == "chat"
                else iter_documents(cfg.data.path, cfg.data.text_column, cfg.data.max_bytes))
        save_tokenizer(train_tokenizer(docs, cfg.data.vocab_size), tmp)
    os.replace(tmp, tok_dir)
    return load_tokenizer(tok_dir), tok_dir


class FreshAdapters:
    """The imported weights, plus the initial value of each adapter (`lora_a_init`): read like a checkpoint, so
    each rank takes its share of both."""

    def __init__(self, weights: HFWeights, seed: int):
        self.weights, self.seed = weights, seed

    def has(self, name: str, kind: str = "model") -> bool:
        return self.weights.has(name, kind) or (kind == "model" and is_lora_name(name))

    def step(self, name: str) -> None:
        return None

    def read(self, name: str, spec, kind: str = "model"):
        if is_lora_name(name):
            return spec.extract(lora_a_init(name, spec.full_shape, self.seed))
        return self.weights.read(name, spec)


def build_dataset(cfg: Config, tokenizer, tokenizer_dir: Path, eos: int, cache_dir: Path | None = None):
    """The run's samples: raw text cut into windows (data.format = "text") or conversations rendered with the
    tokenizer's chat template, loss on assistant tokens (data.format = "chat")."""
    if cfg.data.format == "chat":
        return build_chat_dataset(cfg.data, tokenizer, ChatTemplate.from_dir(tokenizer_dir), cfg.train.seq_len,
                                  cache_dir, pad_id=eos)
    return build_token_dataset(cfg.data, tokenizer, cfg.train.seq_len, cache_dir, eos=eos)


def model_args_for(cfg: Config, vocab_size: int | None = None) -> ModelArgs:
    """The model a run trains: the imported directory's architecture (init.from_hf), else [model] with the
    tokenizer's vocabulary (`vocab_size`, or data.vocab_size before the tokenizer exists)."""
    if cfg.init.from_hf:
        return read_model_args(cfg.init.from_hf)
    return ModelArgs.from_dict({**cfg.model.to_dict(), "vocab_size": vocab_size or cfg.data.vocab_size})


@contextmanager
def rank_zero_first(dist: DistContext) -> Iterator[None]:
    """Rank 0 runs the block first; every other rank runs it once rank 0 is done, so it reads what rank 0 wrote
    (a trained tokenizer, a filled token cache) instead of writing it again. One barrier on every rank."""
    if dist.rank != 0:
        dist.barrier()
    yield
    if dist.rank == 0:
        dist.barrier()


def prepare_model(model, cfg: Config, groups: ProcessGroups | None,
                  init_lora: bool = False) -> dict[str, tuple[int, ...]]:
    """Everything applied to a built model from outside it, in one place and in this order: LoRA adapters (the base
    frozen; initialised here when `init_lora`, on the full tensors, so every layout starts from the same adapters),
    activation checkpointing, then the layout's tensor and expert parallelism (`groups`, None on one process).
    Returns every tensor's full shape from before the sharding: the backends map shards onto it."""
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, parse_targets(cfg.lora.targets))
        if init_lora:
            init_adapters(model, cfg.train.seed)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    full_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if groups is not None:
        parallelize_model(model, groups)
    return full_shapes


class Trainer:
    """The next-token objective (train.objective = "lm"). Another objective subclasses it (moe_platform.post_train)
    and replaces the data (`build_dataset`), the loss (`build_loss_fn`), the micro-batches (`_micro_batches`) and
    what an evaluation reports (`eval_record`); launchers take the class to run (`trainer_cls`)."""

    objective = "lm"
    # Extra Prometheus gauges a launcher exports from each step's metrics: metrics key -> (metric name, description).
    metric_gauges: dict[str, tuple[str, str]] = {}

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """What this objective needs of a config beyond its own validation; launchers call it before any process
        starts."""
        if cfg.train.objective != cls.objective:
            raise ValueError(f"train.objective = {cfg.train.objective!r} is not trained by {cls.__name__} "
                             f"({cls.objective!r}); `moe-platform train` and jobs/train.py pick the trainer of the "
                             f"objective (moe_platform.post_train.trainer_class), and launch_local/launch_ray take it "
                             f"as trainer_cls")

    def __init__(self, cfg: Config, progress: bool = True, dist: DistContext | None = None,
                 hooks: TrainerHooks | None = None):
        self.check_config(cfg)
        self.cfg = cfg
        self.dist = dist or DistContext()
        self.hooks = hooks or TrainerHooks()
        storage = cfg.run.storage_path
        # With a storage URI the run lives in a node-local mirror that checkpoints sync with (checkpoint.remote).
        self.remote = RemoteRun(storage, cfg.run.name) if is_uri(storage) else None
        self.run_dir = (mirror_dir(storage, cfg.run.name, cfg.run.local_dir, self.dist.rank) if self.remote
                        else Path(storage).expanduser() / cfg.run.name)
        self.device = resolve_device(cfg.train.device, self.dist.local_rank)
        self.progress = progress and self.dist.rank == 0
        prec = cfg.train.precision
        self.autocast_dtype = (torch.bfloat16 if prec == "bf16" or (prec == "auto" and self.device.type == "cuda")
                               else torch.float16 if prec == "fp16" else None)
        self.step = 0
        self.counted_targets = 0  # targets the loss counted in the last global batch
        self.resumed_from: int | None = None
        self.resharded = False  # resumed from a checkpoint written by another layout
        self.lost_steps = 0  # logged steps after the resumed checkpoint: done before a crash, computed again
        self.groups: ProcessGroups | None = None

    # -- set-up -------------------------------------------------------------------------------------------------

    def _check_storage(self) -> None:
        if self.remote is not None and self.dist.rank == 0:
            self.remote.check_writable()
        what = "run.local_dir mirror" if self.remote else f"run.storage_path {self.cfg.run.storage_path!r}"
        check_writable(self.run_dir, what)

    def setup(self) -> None:
        """Set the run up in phases, in this order: storage, data (rank 0 first), layout and process groups, model
        (built, then LoRA, activation checkpointing and parallelism applied from outside it), backend, metrics, and
        the resume from the last committed checkpoint."""
        self._setup_storage()
        with rank_zero_first(self.dist):  # rank 0 trains the tokenizer and fills the token cache; the others read
            self._setup_data()
        self._setup_layout()
        self.checkpointer = AsyncCheckpointer(self.run_dir, self.cfg.checkpoint.keep, self.cfg.checkpoint.async_save,
                                              self.dist.rank, self.dist.world_size, self.remote)
        ckpt = self.checkpointer.resume_point()
        self._setup_model_and_backend(ckpt)
        self._setup_metrics()
        self._restore(ckpt)
        self.dist.barrier()

    def _setup_storage(self) -> None:
        if self.dist.rank == 0 or self.remote is not None:  # every node's mirror, and the storage once
            self._check_storage()
        if self.cfg.train.deterministic and self.device.type == "cpu":
            torch.use_deterministic_algorithms(True)

    def _setup_data(self) -> None:
        cfg, rank = self.cfg, self.dist.rank
        if self.remote is not None:
            self.remote.get_dir("tokenizer", self.run_dir / "tokenizer", required="tokenizer.json")
        self.tokenizer, self.tokenizer_dir = prepare_tokenizer(cfg, self.run_dir)
        if self.remote is not None and rank == 0 and not self.remote.exists("tokenizer/tokenizer.json"):
            self.remote.put_dir(self.tokenizer_dir, "tokenizer", last="tokenizer.json")
        self.eos_id = model_stop_ids(self.tokenizer, self.tokenizer_dir)[0]
        cache = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else None
        self.dataset = self.build_dataset(cache)

    def build_dataset(self, cache: Path | None):
        """The run's samples (see the module function `build_dataset`)."""
        return build_dataset(self.cfg, self.tokenizer, self.tokenizer_dir, self.eos_id, cache)

    def build_loss_fn(self):
        """The backend's loss function: the mean cross-entropy over the global batch's counted tokens."""
        return TokenLoss()

    def _setup_layout(self) -> None:
        cfg = self.cfg
        self.sampler = DataSampler(self.dataset.train_ids_count, cfg.train.global_batch_size, cfg.train.seed)
        self.model_args = model_args_for(cfg, self.tokenizer.get_vocab_size())
        if cfg.train.seq_len > self.model_args.max_seq_len:
            raise ValueError(f"invalid config: train.seq_len ({cfg.train.seq_len}) must be <= the imported model's "
                             f"max_position_embeddings ({self.model_args.max_seq_len}, {cfg.init.from_hf})")
        self.layout = resolve_layout(cfg, self.dist.world_size, self.model_args)
        if self.dist.distributed:
            self.groups = build_process_groups(self.layout, self.dist.rank)

    def _setup_model_and_backend(self, ckpt: Path | None) -> None:
        cfg = self.cfg
        reader = self._checked_reader(ckpt) if ckpt is not None else None
        imported = None
        if ckpt is None and cfg.init.from_hf:
            # A fresh run starts from the imported weights (a resume from its own checkpoint). The model is built on
            # meta, sharded by the layout, and each rank then reads only its own share of the model directory.
            reader = imported = HFWeights(cfg.init.from_hf, self.model_args)
            model = build_model(self.model_args, device="meta")
            log.info("starting from %s (%s)", cfg.init.from_hf, self.model_args.hf_architecture)
        else:
            model = build_model(self.model_args, device=self.device, seed=cfg.train.seed)
        # Adapters start from the seed unless a checkpoint holds them; an import reads them as fresh ones.
        full_shapes = prepare_model(model, cfg, self.groups, init_lora=reader is None)
        if cfg.lora.enabled and imported is not None:
            reader = FreshAdapters(imported, cfg.train.seed)
        if self.dist.distributed:
            self.backend = DeepSpeedBackend(model, cfg, self.groups, self.device, full_shapes, reader,
                                            loss_fn=self.build_loss_fn())
        else:
            self.backend = LocalBackend(model, cfg, self.device, self.autocast_dtype,
                                        cfg.train.global_batch_size // cfg.train.micro_batch_size,
                                        loss_fn=self.build_loss_fn())
            if reader is not None:
                self.backend.load_state(reader)
        self.import_read = self._import_read(imported) if imported is not None else None

    def _setup_metrics(self) -> None:
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.flops_per_token = self.model_args.flops_per_token(self.cfg.train.seq_len)
        self.moe_rows = {layer: row for row, layer in enumerate(self.model_args.moe_layer_ids)}
        self.peak_flops = matmul_peak_flops(self.device) * self.dist.world_size
        seed_everything(self.cfg.train.seed + self.dist.rank)

    def _restore(self, ckpt: Path | None) -> None:
        rank = self.dist.rank
        if ckpt is not None:
            state = read_trainer_state(ckpt)
            self.step = state["step"]
            self.sampler.load_state_dict(state["sampler"])
            self.backend.loss_scaler.load_state_dict(state.get("loss_scaler"))
            restore_rank_rng(ckpt, rank)
            self.resumed_from = self.step
            self.resharded = state.get("layout") != self.layout.to_dict()
            log.info("resumed from %s at step %d (written by %s, now %s)", ckpt, self.step,
                     state.get("layout"), self.layout)
        if rank == 0:
            self.lost_steps = self.metrics.truncate_after(self.step)
            extra = {"imported": self.import_read} if self.import_read else {}
            self.log_event("resume" if ckpt is not None else "start", lost_steps=self.lost_steps, **extra)

    def _import_read(self, imported: HFWeights) -> dict[str, Any]:
        """What each rank read of the imported model directory (every rank's count, on every rank)."""
        imported.close()
        counts = [imported.bytes_read]
        if self.dist.distributed:
            counts = [None] * self.dist.world_size
            torch.distributed.all_gather_object(counts, imported.bytes_read)
        log.info("rank %d read %.1f MiB of the %.1f MiB in %s", self.dist.rank, imported.bytes_read / 2**20,
                 imported.total_bytes / 2**20, imported.dir)
        return {"from": str(imported.dir), "bytes_read": counts, "model_bytes": imported.total_bytes}

    def log_event(self, event: str, **extra) -> None:
        """One line in <run>/events.jsonl per start, resume (with the logged steps that will be computed again) and
        stop for a preemption or resize (launchers add why): the run's history across restarts, which metrics.jsonl
        (one line per step) does not keep. Rank 0 writes it."""
        rec = {"time": time.time(), "event": event, "step": self.step, "world_size": self.dist.world_size,
               "layout": str(self.layout), **extra}
        with open(self.run_dir / "events.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _checked_reader(self, ckpt: Path) -> ShardedReader:
        saved = read_trainer_state(ckpt)
        now = self.model_args.to_dict()
        if saved["model_args"] != now:
            diff = {k: (v, now.get(k)) for k, v in saved["model_args"].items() if now.get(k) != v}
            raise ValueError(f"checkpoint {ckpt} was written by a different model config (saved, now): {diff}; "
                             f"use another run.name or storage_path to start a new run")
        return ShardedReader(ckpt)

    # -- training ------------------------------------------------------------------------------------------------

    @property
    def model(self):
        return self.backend.model

    @property
    def dp(self) -> tuple[int, int]:
        return (self.groups.dp_rank, self.groups.dp_size) if self.groups else (0, 1)

    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "sampler": self.sampler.state_dict(), "model_args": self.model_args.to_dict(),
                "config": config_to_dict(self.cfg), "layout": self.layout.to_dict(),
                "world_size": self.dist.world_size, "lr_schedule": {"kind": "warmup_cosine", "step": self.step},
                "loss_scaler": self.backend.loss_scaler.state_dict()}

    def _micro_batches(self, ids: np.ndarray) -> list[tuple[torch.Tensor, ...]]:
        """This rank's micro-batches of the global batch `ids`; sets the loss scale so that the step's loss is the
        mean over every counted target of `ids` (TokenLoss)."""
        mbs = self.cfg.train.micro_batch_size
        counted = self.dataset.count_targets(ids)
        self.backend.loss_fn.scale = (len(ids) // mbs) / max(counted, 1)
        self.counted_targets = counted
        local = self.sampler.shard(ids, *self.dp)
        return [tuple(t.to(self.device, non_blocking=True) for t in self.dataset.get(m))
                for m in self.sampler.micro_batches(local, mbs)]

    def _global_moe_stats(self) -> tuple[float, torch.Tensor]:
        """Balancing loss (as one process would report it) and tokens per expert for every layer, over all ranks."""
        moes = self.backend.moe_layers
        row = self.moe_rows
        loads = torch.zeros(len(row), self.model_args.num_experts)  # (MoE layers, E); dense layers route nothing
        aux = torch.zeros(())
        for m in moes:
            loads[row[m.layer_idx]] += m.step_load.float().cpu()
            aux += m.step_aux.cpu()
            m.reset_step_stats()
        if self.dist.distributed:
            packed = torch.cat([loads.flatten(), aux[None]]).to(collective_device())
            torch.distributed.all_reduce(packed)
            packed = packed.cpu()
            tp = self.groups.tp_size
            loads = packed[:-1].view_as(loads) / tp  # tensor-parallel ranks saw the same tokens
            aux = packed[-1] / (tp * self.groups.dp_size)
        return float(aux), loads

    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg.train
        t0 = time.perf_counter()
        lr = lr_at(self.step, cfg)
        self.backend.set_lr(lr)
        ids = self.sampler.next_global_batch()
        loss, grad_norm = self.backend.train_batch(self._micro_batches(ids))
        aux, loads = self._global_moe_stats()
        if not self.cfg.lora.enabled:  # LoRA freezes the base, its routing bias included (the adapter is the delta)
            update_routing_biases(self.backend.moe_layers, self.model_args.bias_update_rate,
                                  [loads[self.moe_rows[m.layer_idx]] for m in self.backend.moe_layers])
        self.step += 1
        dt = time.perf_counter() - t0
        tokens_per_s = len(ids) * cfg.seq_len / dt
        rec = {
            "step": self.step, "loss": loss, "aux_loss": aux, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * self.flops_per_token / self.peak_flops,
            "expert_imbalance": float((loads.max(dim=1).values / loads.mean(dim=1).clamp(min=1e-9)).mean()),
            "tokens_per_expert": loads.sum(0).tolist(), "step_time_s": dt, "time": time.time(),
            "loss_tokens": self.counted_targets, **self.backend.loss_scaler.metrics(),
        }
        if cfg.log_sample_ids:
            rec["sample_ids"] = ids.tolist()
        return rec

    @torch.no_grad()
    def evaluate(self, max_batches: int = 8) -> float | None:
        """Validation loss over up to `max_batches` micro-batches per data-parallel rank."""
        val = self.dataset.val_ids()
        mbs = self.cfg.train.micro_batch_size
        dp_size = self.dp[1]
        per_rank = min(len(val) // (mbs * dp_size), max_batches) * mbs
        if per_rank == 0:
            return None
        return self.backend.eval_loss(self._micro_batches(val[: per_rank * dp_size]))

    def eval_record(self) -> dict[str, Any]:
        """What an evaluation adds to its step's metrics line (and to summary.json at the end of the run)."""
        return {"val_loss": self.evaluate()}

    def save_checkpoint(self, blocking: bool = False) -> None:
        rank = self.dist.rank
        meta = {"layout": self.layout.to_dict(), "world_size": self.dist.world_size}

        def snap():
            return take_snapshot(self.step, rank, self.backend.local_state(),
                                 self.trainer_state() if rank == 0 else None,
                                 self.tokenizer_dir if rank == 0 else None, meta)

        self._announce_commits(self.checkpointer.save(snap, blocking=blocking), blocking)

    def _announce_commits(self, confirmed: list[tuple[Path | None, int]], blocking: bool) -> None:
        """on_checkpoint for each commit all ranks now know of (one process: a blocking one; on_step sees the rest)."""
        for committed, step in confirmed if self.dist.distributed else confirmed[-1:] if blocking else []:
            if self.hooks.on_checkpoint is not None:
                self.hooks.on_checkpoint(committed, step)

    def _preemption_requested(self) -> bool:
        """True on every rank as soon as any rank's launcher reports a preemption notice."""
        flag = bool(self.hooks.preemption_requested and self.hooks.preemption_requested())
        return any_rank(flag) if self.dist.distributed else flag

    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to train.steps; `stop_after` ends early at that step (checkpointed) as a planned interruption."""
        cfg = self.cfg
        total = cfg.train.steps if stop_after is None else min(stop_after, cfg.train.steps)
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc=f"train {cfg.run.name} [{self.layout}]",
                   disable=not self.progress, dynamic_ncols=True)
        rec: dict[str, Any] = {"loss": float("nan")}
        while self.step < total:
            rec = self.train_step()
            if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0:
                rec.update(self.eval_record())
            if self.dist.rank == 0 and (self.step % cfg.train.log_interval == 0 or self.step == total):
                self.metrics.append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if self.hooks.on_step is not None:
                self.hooks.on_step(rec)
            if (self.hooks.preemption_requested is not None
                    and self.step % cfg.failure.preemption_check_steps == 0 and self._preemption_requested()):
                log.warning("preemption notice at step %d: writing a just-in-time checkpoint", self.step)
                self.save_checkpoint(blocking=True)
                if self.dist.rank == 0:
                    self.log_event("checkpoint_and_stop")
                bar.close()
                return TrainResult(self.run_dir, self.step, rec["loss"], None, self.resumed_from, str(self.layout),
                                   preempted=True)
            if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0 and self.step < total:
                self.save_checkpoint()
        bar.close()
        if self.resumed_from != self.step or self.resharded:  # a resharded resume is re-saved in the new layout
            self.save_checkpoint(blocking=True)
        self._announce_commits(self.checkpointer.wait(), blocking=False)
        if self.step < cfg.train.steps:
            return TrainResult(self.run_dir, self.step, rec["loss"], None, self.resumed_from, str(self.layout))
        final_eval = self.eval_record()
        export_dir = None
        if self.dist.rank == 0:
            if cfg.checkpoint.export:
                final = self.checkpointer.local_checkpoint(self.step)
                # A LoRA run exports the adapted model (adapters folded in: what serving loads) and its adapters.
                export_dir = export_checkpoint(final, self.run_dir / "export", merge=True)
                if cfg.lora.enabled:
                    export_checkpoint(final, self.run_dir / "adapter")
                if self.hooks.on_export is not None:  # a LoRA run publishes its adapter (served on the base)
                    self.hooks.on_export(self.run_dir / "adapter" if cfg.lora.enabled else export_dir, self.step)
                elif cfg.checkpoint.publish_to:
                    log.warning("checkpoint.publish_to = %r, but this launcher was given no publisher: nothing was "
                                "published (`moe-platform train` and jobs/train.py publish)", cfg.checkpoint.publish_to)
            write_loss_curve(self.metrics.path, self.run_dir / "loss.png", title=cfg.run.name)
            summary = {"final_step": self.step, "final_loss": rec["loss"], **final_eval,
                       "resumed_from": self.resumed_from, "layout": str(self.layout),
                       "export": str(export_dir) if export_dir else None}
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if self.remote is not None:
                self.remote.put_results(self.run_dir)
        self.dist.barrier()
        return TrainResult(self.run_dir, self.step, rec["loss"], export_dir, self.resumed_from, str(self.layout))


def train(cfg: Config, progress: bool = True, dist: DistContext | None = None) -> TrainResult:
    trainer = Trainer(cfg, progress=progress, dist=dist)
    trainer.setup()
    return trainer.fit()


__all__ = ["DistContext", "Layout", "TrainResult", "Trainer", "train"]
