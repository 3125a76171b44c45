"""The GRPO objective: group-normalised advantages, per-token log-probabilities, the clipped loss and its statistics.

For the G completions of one prompt with rewards r_1..r_G, completion i's advantage is
A_i = (r_i - mean(r)) / (std(r) + 1e-4) (std with Bessel's correction, as TRL's GRPOTrainer), and 0 for every
completion of a group whose rewards are all equal (nothing to prefer). For each completion token t, with
pi = the policy's probability of the token under the tempered distribution softmax(logits / temperature), pi_old
that of the policy that sampled it, and ratio = pi / pi_old:

    loss_t = -min(ratio A, clip(ratio, 1 - clip_eps, 1 + clip_eps) A) + kl_coef k3_t
    k3_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1      (ref_t: the reference policy's log-probability)

`token_mean` averages loss_t over every completion token of the step's global batch (TRL's "dapo"); `seq_mean`
averages each completion's tokens first, then the completions (TRL's "grpo"). The learner steps once per generation
round, so pi_old is the policy itself (its log-probabilities detached: ratio 1, the gradient of A log pi) unless
old log-probabilities are given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_platform.config.schema import GRPOConfig
from moe_platform.train.data import IGNORE_INDEX

STD_EPS = 1e-4
# What GRPOLoss sums over the completions it scores; a step's metrics are these sums over the counts.
STATS = ("completions", "tokens", "loss", "kl", "clipped", "logp")
# And takes the maximum of: the largest |engine - learner| log-probability of a sampled token (at temperature 1).
MAX_STATS = ("logp_gap",)
# The per-token side inputs of a micro-batch (labels[2] (R, T, 3)); NaN where absent.
OLD, REF, ENGINE = 0, 1, 2


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards (N,) of N / group_size consecutive groups -> advantages (N,) (see the module docstring)."""
    groups = rewards.double().view(-1, group_size)  # (P, G)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)
    flat = (groups == groups[:, :1]).all(dim=1, keepdim=True)
    advantages = torch.where(flat, torch.zeros_like(groups), (groups - mean) / (std + STD_EPS))
    return advantages.view(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) of each target: logits (R, T, V), targets (R, T) -> (R, T) fp32, 0 where
    the target is IGNORE_INDEX."""
    rows, steps = targets.shape
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    out = -F.cross_entropy(scaled.reshape(rows * steps, -1), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="none")
    return out.view(rows, steps)


def grpo_token_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      ref_logps: torch.Tensor | None, clip_eps: float, kl_coef: float
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(loss_t (R, T), k3_t (R, T) or None without a reference, whether the ratio was clipped in the direction that
    stops the gradient (R, T) bool) for logps, old_logps, ref_logps (R, T) and advantages (R,)."""
    adv = advantages[:, None].to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    losses = -torch.min(ratio * adv, clipped_ratio * adv)
    kl = None
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        losses = losses + kl_coef * kl
    clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    return losses, kl, clipped


class GRPOLoss:
    """A backend's loss function for GRPO micro-batches (see `GRPOTrainer`).

    A micro-batch holds R completions, each a right-padded sequence of prompt + completion tokens: logits (R, T, V),
    and labels (targets (R, T), with IGNORE_INDEX except where the next token is a completion token; advantages (R,);
    side (R, T, 3) float: per target, the old policy's, the reference's and the rollout engine's log-probability,
    NaN where there is none). The loss is the sum of the micro-batch's terms times `scale`, which the trainer sets
    before each step to (micro-batches in the global batch) / (completion tokens in it) for token_mean, or / (its
    completions) for seq_mean, every completion contributing its token mean: every backend averages micro-batch
    losses over accumulation steps and data-parallel ranks, so a step's objective is the same on every layout. Under
    pipeline parallelism it runs on the last stage, which is why everything travels with the labels.

    With `mode = "logps"` it returns the per-token log-probabilities (R, T) at `temperature` instead and records
    nothing (how the trainer computes the reference's through the same backend). In "loss" mode it adds to `stats`
    (sums of STATS) and `maxima` (MAX_STATS), reset by the trainer before each step.
    """

    def __init__(self, cfg: GRPOConfig):
        self.cfg = cfg
        self.temperature = cfg.temperature
        self.scale = 1.0
        self.mode = "loss"
        self.stats: torch.Tensor | None = None
        self.maxima: torch.Tensor | None = None

    def reset_stats(self) -> None:
        self.stats = self.maxima = None

    def __call__(self, logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        targets, advantages, side = labels
        logps = token_logps(logits, targets, self.temperature)
        if self.mode == "logps":
            return logps.detach()
        mask = (targets != IGNORE_INDEX).to(logps.dtype)
        side = side.to(logps.dtype)
        old = torch.where(torch.isnan(side[..., OLD]), logps.detach(), side[..., OLD])
        ref = side[..., REF] if self.cfg.kl_coef > 0 else None
        losses, kl, clipped = grpo_token_losses(logps, old, advantages, ref, self.cfg.clip_eps, self.cfg.kl_coef)
        tokens = mask.sum(dim=1)
        if self.cfg.loss_agg == "token_mean":
            total = (losses * mask).sum()
        else:
            total = ((losses * mask).sum(dim=1) / tokens.clamp(min=1)).sum()
        self._record(logits, targets, logps.detach(), mask, kl, clipped, side[..., ENGINE], losses.detach())
        return total * self.scale

    @torch.no_grad()
    def _record(self, logits, targets, logps, mask, kl, clipped, engine, losses) -> None:
        counted = mask.bool()
        # The engine reports log-probabilities of the untempered distribution (as vLLM does): compare at temperature 1.
        plain = logps if self.temperature == 1.0 else token_logps(logits, targets, 1.0)
        gap = (plain - engine).abs()
        gap = gap[counted & ~torch.isnan(engine)]
        zero = torch.zeros((), dtype=torch.float64, device=logps.device)
        sums = torch.stack([torch.tensor(float(len(mask)), dtype=torch.float64, device=logps.device),
                            mask.sum().double(), (losses * mask).sum().double(),
                            (kl * mask).sum().double() if kl is not None else zero,
                            (clipped & counted).sum().double(), (logps * mask).sum().double()])
        maxima = torch.stack([gap.max().double() if gap.numel() else zero])
        self.stats = sums if self.stats is None else self.stats + sums
        self.maxima = maxima if self.maxima is None else torch.maximum(self.maxima, maxima)


def stats_metrics(totals: torch.Tensor, maxima: torch.Tensor, kl: bool) -> dict[str, float]:
    """The step's loss statistics from the summed STATS and MAX_STATS: per-token means of the loss terms, KL
    (when there is a reference), clip fraction and policy log-probability, and the largest engine/learner gap."""
    tokens = float(totals[1])
    if tokens == 0:
        return {}
    out = {"clip_fraction": float(totals[4]) / tokens, "logps": float(totals[5]) / tokens,
           "logp_gap": float(maxima[0])}
    if kl:
        out["kl"] = float(totals[3]) / tokens
    return out
