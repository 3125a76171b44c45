"""The DPO objective: per-sequence log-probabilities of the responses, the loss of each pair, and its statistics.

For a pair with chosen response y_w and rejected y_l, log-ratios r_w = log pi(y_w|x) - log pi_ref(y_w|x) and
r_l likewise (sums over the response tokens), and margin m = r_w - r_l, the losses are TRL DPOTrainer's:

    sigmoid  -log sigmoid(beta m)                (the DPO paper; with label smoothing p, conservative DPO:
                                                  -(1 - p) log sigmoid(beta m) - p log sigmoid(-beta m))
    hinge    relu(1 - beta m)                    (SLiC)
    ipo      (r_w / |y_w| - r_l / |y_l| - 1 / (2 beta))^2   (IPO, with per-token averaged log-ratios)

The implicit rewards are beta r_w and beta r_l; a pair counts as ranked right when beta r_w > beta r_l. The
objective of a step is the mean loss over the pairs of the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_platform.config.schema import DPOConfig
from moe_platform.train.data import IGNORE_INDEX

# What DPOLoss sums over the pairs it scores (one slot each): the metrics are these sums over the pair count.
STATS = ("pairs", "loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
         "logps/chosen", "logps/rejected", "ref_logps/chosen", "ref_logps/rejected")


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(target) over the counted targets of each row, how many there are): logits (R, T, V), targets
    (R, T) with IGNORE_INDEX where not counted -> (R,), (R,)."""
    rows, steps = targets.shape
    token_logps = -F.cross_entropy(logits.reshape(rows * steps, -1).float(), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="none")  # 0 where ignored
    return token_logps.view(rows, steps).sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


def dpo_losses(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
               ref_rejected_logps: torch.Tensor, cfg: DPOConfig, chosen_tokens: torch.Tensor | None = None,
               rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss of each pair, chosen rewards, rejected rewards) for `cfg.loss_type` (see the module docstring); ipo needs
    the response token counts."""
    chosen_ratios = chosen_logps - ref_chosen_logps
    rejected_ratios = rejected_logps - ref_rejected_logps
    beta = cfg.beta
    if cfg.loss_type == "sigmoid":
        margin = beta * (chosen_ratios - rejected_ratios)
        losses = -F.logsigmoid(margin)
        if cfg.label_smoothing:
            losses = (1 - cfg.label_smoothing) * losses - cfg.label_smoothing * F.logsigmoid(-margin)
    elif cfg.loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen_ratios - rejected_ratios))
    elif cfg.loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("dpo.loss_type = 'ipo' averages the log-ratios over the response tokens: pass their "
                             "counts")
        margin = chosen_ratios / chosen_tokens.clamp(min=1) - rejected_ratios / rejected_tokens.clamp(min=1)
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss_type must be sigmoid, ipo or hinge, got {cfg.loss_type!r}")
    return losses, beta * chosen_ratios.detach(), beta * rejected_ratios.detach()


class DPOLoss:
    """A backend's loss function for DPO micro-batches (see `DPOTrainer`).

    A micro-batch holds B pairs: logits (2B, T, V) of the B chosen sequences then the B rejected ones, and labels
    (targets (2B, T), the reference log-probabilities (2B,) of the same sequences). The loss is the sum of the pairs'
    losses times `scale`, which the trainer sets to (micro-batches in the global batch) / (pairs in it) before each
    step: every backend averages micro-batch losses over accumulation steps and data-parallel ranks, so a step's
    objective is the mean over the pairs of the global batch on every layout. Under pipeline parallelism it runs on
    the last stage, which is why the reference log-probabilities travel with the labels.

    With `mode = "logps"` it returns each sequence's summed response log-probability (2B,) instead and records
    nothing: how the trainer computes the reference's log-probabilities through the same backend. In "loss" mode it
    adds each pair to `stats` (the sums of `STATS`), reset by the trainer before each step and each evaluation.
    """

    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg
        self.scale = 1.0
        self.mode = "loss"
        self.stats: torch.Tensor | None = None  # on the logits' device: no host sync per micro-batch

    def reset_stats(self) -> None:
        self.stats = None

    def __call__(self, logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        targets, ref_logps = labels
        logps, tokens = sequence_logps(logits, targets)
        if self.mode == "logps":
            return logps.detach()
        chosen, rejected = logps.chunk(2)  # the batch is [chosen; rejected]
        ref_chosen, ref_rejected = ref_logps.to(logps.dtype).chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, self.cfg,
                                                              chosen_tokens, rejected_tokens)
        self._record(losses.detach(), chosen_rewards, rejected_rewards, chosen.detach(), rejected.detach(),
                     ref_chosen, ref_rejected)
        return losses.sum() * self.scale

    def _record(self, losses, chosen_rewards, rejected_rewards, chosen, rejected, ref_chosen, ref_rejected) -> None:
        sums = torch.stack([torch.tensor(float(len(losses)), device=losses.device), losses.sum(),
                            chosen_rewards.sum(), rejected_rewards.sum(), (chosen_rewards - rejected_rewards).sum(),
                            (chosen_rewards > rejected_rewards).float().sum(), chosen.sum(), rejected.sum(),
                            ref_chosen.sum(), ref_rejected.sum()])
        sums = sums.to(torch.float64)
        self.stats = sums if self.stats is None else self.stats + sums


def stats_metrics(totals: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """The means of the summed `STATS` (over the pairs counted), keyed `prefix + name`; the loss as `prefix + loss`."""
    pairs = float(totals[0])
    if pairs == 0:
        return {}
    return {f"{prefix}{name}": float(value) / pairs for name, value in zip(STATS[1:], totals[1:], strict=True)}
