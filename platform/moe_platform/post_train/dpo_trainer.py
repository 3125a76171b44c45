"""DPO training (train.objective = "dpo"): the Trainer's loop, checkpoints, resume and layouts, with preference pairs,
a reference policy and the DPO loss.

Each step, every rank first computes the reference log-probabilities of its micro-batches with a no-grad forward of
the reference (the policy's own modules, `ReferencePolicy`) on the same layout and backend, then hands each
micro-batch to the backend as (inputs, (targets, reference log-probs)): the loss function, which DeepSpeed's
pipeline engine calls on the last stage, has both log-probabilities of each sequence of a pair there. The reference
numbers are plain tensors of the step: never parameters, never optimizer state, never in a checkpoint.

Metrics (metrics.jsonl, and Prometheus through a launcher's `metric_gauges`): the step's `loss` (mean over its pairs),
`rewards/chosen`, `rewards/rejected`, `rewards/margin`, `rewards/accuracy` (pairs whose chosen reward is the higher),
`logps/chosen`, `logps/rejected` (policy) and `ref_logps/chosen`, `ref_logps/rejected` (reference), all means over
the global batch's pairs; at eval steps the same over held-out pairs as `val_loss`, `val_rewards/accuracy` (the
held-out preference accuracy), `val_rewards/margin`, ...
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_platform.parallel.comm import collective_device
from moe_platform.post_train.dpo import STATS, DPOLoss, stats_metrics
from moe_platform.post_train.grpo_trainer import GRPOTrainer
from moe_platform.post_train.preference_data import build_preference_dataset
from moe_platform.post_train.reference import ReferencePolicy
from moe_platform.tokenizer import ChatTemplate
from moe_platform.train.trainer import Trainer

log = logging.getLogger("moe_platform.post_train")


class DPOTrainer(Trainer):
    """See the module docstring."""

    objective = "dpo"
    metric_gauges = {
        "rewards/chosen": ("moe_train_rewards_chosen", "DPO: mean implicit reward of the chosen responses"),
        "rewards/rejected": ("moe_train_rewards_rejected", "DPO: mean implicit reward of the rejected responses"),
        "rewards/margin": ("moe_train_rewards_margin", "DPO: mean reward margin, chosen minus rejected"),
        "rewards/accuracy": ("moe_train_rewards_accuracy", "DPO: fraction of pairs whose chosen reward is higher"),
        "logps/chosen": ("moe_train_logps_chosen", "DPO: policy log-probability of the chosen responses"),
        "logps/rejected": ("moe_train_logps_rejected", "DPO: policy log-probability of the rejected responses"),
        "ref_logps/chosen": ("moe_train_ref_logps_chosen", "DPO: reference log-probability of the chosen responses"),
        "ref_logps/rejected": ("moe_train_ref_logps_rejected",
                               "DPO: reference log-probability of the rejected responses"),
        "val_rewards/accuracy": ("moe_train_val_rewards_accuracy", "DPO: held-out preference accuracy"),
        "val_rewards/margin": ("moe_train_val_rewards_margin", "DPO: mean held-out reward margin"),
        "val_loss": ("moe_train_val_loss", "loss over the held-out samples at the last eval step"),
    }

    # -- set-up --------------------------------------------------------------------------------------------------

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if not cfg.init.from_hf:
            raise ValueError("invalid config: train.objective = 'dpo' fine-tunes a trained model: set init.from_hf to "
                             "its directory (a Hugging Face model or a moe-platform export)")

    def build_dataset(self, cache: Path | None):
        cfg = self.cfg
        return build_preference_dataset(cfg.data, self.tokenizer, ChatTemplate.from_dir(self.tokenizer_dir),
                                        cfg.train.seq_len, cache, pad_id=self.eos_id)

    def build_loss_fn(self) -> DPOLoss:
        return DPOLoss(self.cfg.dpo)

    def _setup_model_and_backend(self, ckpt: Path | None) -> None:
        super()._setup_model_and_backend(ckpt)
        backend = self.backend
        state = backend.model.state_dict(keep_vars=True)
        self.reference = ReferencePolicy(self.cfg, backend.model, {n: state[n] for n in backend.specs},
                                         backend.specs, self.model_args)

    def _restore(self, ckpt: Path | None) -> None:
        """After the resume: the reference's set-up in events.jsonl, and for a fresh run that evaluates, the held-out
        numbers of the starting point (event "start_eval"), from which the eval steps' preference accuracy rises."""
        super()._restore(ckpt)
        start = self.eval_record() if ckpt is None and self.cfg.train.eval_interval else None
        if self.dist.rank == 0:
            self.log_event("reference", source=self.cfg.dpo.reference, adapters_off=self.reference.adapters_off,
                           rank0_reference_bytes=self.reference.copied_bytes)
            if start is not None:
                self.log_event("start_eval", **start)

    # -- batches -------------------------------------------------------------------------------------------------

    def _micro_batches(self, ids: np.ndarray) -> list[tuple]:
        """This rank's micro-batches of the pairs `ids` as (inputs, (targets, reference log-probs)); sets the loss
        scale so that the step's loss is the mean over the pairs of `ids`."""
        mbs = self.cfg.train.micro_batch_size
        loss_fn: DPOLoss = self.backend.loss_fn
        loss_fn.scale = (len(ids) // mbs) / len(ids)
        self.counted_targets = self.dataset.count_targets(ids)
        local = self.sampler.shard(ids, *self.dp)
        batches = [tuple(t.to(self.device, non_blocking=True) for t in self.dataset.get(m))
                   for m in self.sampler.micro_batches(local, mbs)]
        refs = self._reference_logps(batches)
        return [(inputs, (targets, ref)) for (inputs, targets), ref in zip(batches, refs, strict=True)]

    def _reference_logps(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Each sequence's summed response log-probability under the reference, per micro-batch (zeros on pipeline
        stages that do not compute the loss: only the last stage reads them)."""
        loss_fn: DPOLoss = self.backend.loss_fn
        placeholders = [torch.zeros(len(inputs), device=self.device) for inputs, _ in batches]
        loss_fn.mode = "logps"
        try:
            with self.reference.active():
                outputs = self.backend.eval_outputs([(inputs, (targets, ref)) for (inputs, targets), ref
                                                     in zip(batches, placeholders, strict=True)])
        finally:
            loss_fn.mode = "loss"
        return placeholders if outputs is None else [o.float() for o in outputs]

    def _pair_totals(self) -> torch.Tensor:
        """The sums of `STATS` over every pair the loss function saw since its last reset, over all ranks (each
        pair counted once: by the ranks that compute the loss, tensor-parallel rank 0)."""
        loss_fn: DPOLoss = self.backend.loss_fn
        mine = loss_fn.stats if loss_fn.stats is not None else torch.zeros(len(STATS), dtype=torch.float64)
        loss_fn.reset_stats()
        if not self.dist.distributed:
            return mine.cpu()
        g = self.groups
        counts = g.tp_rank == 0 and g.pp_rank == g.layout.pp - 1
        packed = (mine if counts else torch.zeros_like(mine)).to(collective_device())
        torch.distributed.all_reduce(packed)
        return packed.cpu()

    # -- steps and evaluation ------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        self.backend.loss_fn.reset_stats()
        rec = super().train_step()
        metrics = stats_metrics(self._pair_totals())
        metrics.pop("loss", None)  # the backend's loss of the step: the same mean
        rec.update(metrics)
        rec["pairs"] = self.cfg.train.global_batch_size
        return rec

    @torch.no_grad()
    def eval_record(self, max_batches: int = 8) -> dict[str, Any]:
        """The DPO loss, rewards and preference accuracy over up to `max_batches` micro-batches of held-out pairs per
        data-parallel rank (the same pairs at every eval step)."""
        val = self.dataset.val_ids()
        mbs = self.cfg.train.micro_batch_size
        dp_size = self.dp[1]
        per_rank = min(len(val) // (mbs * dp_size), max_batches) * mbs
        if per_rank == 0:
            return {"val_loss": None}
        self.backend.loss_fn.reset_stats()
        saved = self.counted_targets
        self.backend.eval_outputs(self._micro_batches(val[: per_rank * dp_size]))
        self.counted_targets = saved
        totals = self._pair_totals()
        return {**stats_metrics(totals, prefix="val_"), "val_pairs": int(totals[0])}

    def evaluate(self, max_batches: int = 8) -> float | None:
        return self.eval_record(max_batches)["val_loss"]


def trainer_class(objective: str) -> type[Trainer]:
    """The trainer of `train.objective`."""
    trainers = {"lm": Trainer, "dpo": DPOTrainer, "grpo": GRPOTrainer}
    if objective not in trainers:
        raise ValueError(f"train.objective must be one of {', '.join(trainers)}, got {objective!r}")
    return trainers[objective]
