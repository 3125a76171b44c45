"""GRPO training (train.objective = "grpo"): the Trainer's loop, checkpoints, resume and layouts, with rollouts from
our serving engine, reward functions, group advantages and the clipped policy-gradient loss.

One step, on every layout:
1. generate (rank 0): the step's prompts (the sampler's next global_batch_size / group_size prompt ids), each
   group_size times with its own seed from the run's rollout generator, on the rollout engines (`rollout`,
   `rollout_workers`);
2. score (rank 0): the reward functions on every completion (`scoring`), advantages normalised per group (`grpo`);
3. learn: rank 0 hands the round to every rank (one broadcast); each rank takes its data-parallel share of the
   completions as micro-batches, the reference's log-probabilities first when grpo.kl_coef > 0 (the policy's own
   modules with the adapters off, `reference`), then the backend's optimizer step with `GRPOLoss`: the learner
   recomputes the policy's log-probabilities on its own layout;
4. sync: the new weights reach the rollout engines before the next round (`weight_sync` onto rank 0, then the
   object store, or only the adapters with LoRA).

Every completion's engine log-probability is compared with the learner's own for the same token under the same
weights (`logp_gap`, the largest difference, at temperature 1): a stale or half-applied sync shows there at once.
The rollout generator's state is part of every checkpoint, beside the sampler's position, so a resumed run makes the
same rollouts; the rollout engines of a resumed run start from the checkpoint's weights.

Metrics (metrics.jsonl, and Prometheus through a launcher's `metric_gauges`): `reward` (mean), `reward_std` (mean
within-group std), `rewards/<module:function>` (each function's mean), `response_length` (mean completion tokens),
`truncated_fraction` (completions that hit max_new_tokens), `kl` (with a reference), `clip_fraction`, `logps`,
`logp_gap`, the step's breakdown `generate_seconds`, `score_seconds`, `learn_seconds`, `sync_seconds`, and
`sync_bytes`, `rollout_tokens_per_s`, `learner_tokens_per_s`, `rollout_restarts` (rollout workers replaced so far),
`rollout_seed` (the round's first sampling seed: a resumed run's match the straight run's) and `row_width` (the
positions of the learner's rows: the round's longest sequence, in steps of 8, at most train.seq_len); at eval steps
`val_reward`, the mean reward of greedy completions of held-out prompts.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_platform.config import Config, resource_amounts, reward_specs
from moe_platform.parallel.comm import collective_device
from moe_platform.post_train.grpo import ENGINE, MAX_STATS, REF, STATS, GRPOLoss, group_advantages, stats_metrics
from moe_platform.post_train.prompt_data import build_prompt_dataset, read_rows
from moe_platform.post_train.reference import ReferencePolicy
from moe_platform.post_train.rollout import EngineSpec, LocalRollouts, RolloutRequest
from moe_platform.post_train.scoring import RewardFunctions
from moe_platform.post_train.weight_sync import gather_policy
from moe_platform.tokenizer import TOKENIZER_FILES, ChatTemplate, model_stop_ids
from moe_platform.train.checkpointing import read_trainer_state
from moe_platform.train.data import IGNORE_INDEX, DataSampler
from moe_platform.train.trainer import Trainer

log = logging.getLogger("moe_platform.post_train")
EVAL_PROMPTS = 32  # held-out prompts an eval step completes (greedily) at most
_ROLLOUT_STREAM = 0x47525030  # the rollout generator's stream beside train.seed


class GRPOTrainer(Trainer):
    """See the module docstring."""

    objective = "grpo"
    metric_gauges = {
        "reward": ("moe_train_grpo_reward", "GRPO: mean reward of the step's completions"),
        "reward_std": ("moe_train_grpo_reward_std", "GRPO: mean standard deviation of rewards within a prompt's group"),
        "kl": ("moe_train_grpo_kl", "GRPO: mean per-token KL (k3) of the policy from the reference"),
        "clip_fraction": ("moe_train_grpo_clip_fraction", "GRPO: completion tokens whose probability ratio was "
                                                          "clipped, as a fraction"),
        "response_length": ("moe_train_grpo_response_length", "GRPO: mean completion length in tokens"),
        "logp_gap": ("moe_train_grpo_logp_gap", "GRPO: largest |engine - learner| log-probability of a sampled "
                                                "token (a stale sync shows here)"),
        "sync_seconds": ("moe_train_grpo_sync_seconds", "GRPO: seconds to bring the new weights to every rollout "
                                                        "engine"),
        "sync_bytes": ("moe_train_grpo_sync_bytes", "GRPO: bytes published to the rollout engines in the last sync"),
        "rollout_tokens_per_s": ("moe_train_grpo_rollout_tokens_per_s", "GRPO: completion tokens generated per "
                                                                        "second"),
        "learner_tokens_per_s": ("moe_train_grpo_learner_tokens_per_s", "GRPO: tokens per second of the learner's "
                                                                        "passes and update"),
        "generate_seconds": ("moe_train_grpo_generate_seconds", "GRPO: seconds of the step spent generating"),
        "score_seconds": ("moe_train_grpo_score_seconds", "GRPO: seconds of the step spent on rewards and "
                                                          "advantages"),
        "learn_seconds": ("moe_train_grpo_learn_seconds", "GRPO: seconds of the step spent learning"),
        "val_reward": ("moe_train_grpo_val_reward", "GRPO: mean reward of greedy completions of held-out prompts"),
    }

    # -- set-up --------------------------------------------------------------------------------------------------

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Beyond the config's own checks: a policy to start from, and reward functions that import and give a finite
        number on the first rows of the data (before any process starts, and again on every rank)."""
        super().check_config(cfg)
        if not cfg.init.from_hf:
            raise ValueError("invalid config: train.objective = 'grpo' trains a policy from a model: set init.from_hf "
                             "to its directory (a Hugging Face model or a moe-platform export)")
        rows, where = read_rows(cfg.data, limit=4)
        RewardFunctions(cfg.grpo.reward, cfg.grpo.reward_weights).check(rows, where)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollout_rng = np.random.Generator(np.random.PCG64([self.cfg.train.seed, _ROLLOUT_STREAM]))
        self.rollouts = None
        self.reference: ReferencePolicy | None = None
        self.last_round: dict[str, Any] | None = None  # rank 0: the last round's rollouts, rewards and timings
        self._seen_restarts = 0
        self._width: int | None = None  # the last step's row width
        self.reward_specs = reward_specs(self.cfg.grpo.reward, self.cfg.grpo.reward_weights)

    def build_dataset(self, cache: Path | None):
        cfg = self.cfg
        return build_prompt_dataset(cfg.data, self.tokenizer, ChatTemplate.from_dir(self.tokenizer_dir),
                                    cfg.train.seq_len + 1 - cfg.grpo.max_new_tokens)

    def build_loss_fn(self) -> GRPOLoss:
        return GRPOLoss(self.cfg.grpo)

    def _setup_layout(self) -> None:
        super()._setup_layout()
        # A sample is a prompt: global_batch_size counts completions, group_size per prompt.
        cfg = self.cfg
        self.sampler = DataSampler(self.dataset.train_ids_count, cfg.train.global_batch_size // cfg.grpo.group_size,
                                   cfg.train.seed)

    def _setup_model_and_backend(self, ckpt: Path | None) -> None:
        super()._setup_model_and_backend(ckpt)
        if self.cfg.grpo.kl_coef > 0:
            backend = self.backend
            state = backend.model.state_dict(keep_vars=True)
            self.reference = ReferencePolicy(self.cfg, backend.model, {n: state[n] for n in backend.specs},
                                             backend.specs, self.model_args)

    def _restore(self, ckpt: Path | None) -> None:
        """After the resume: the rollout generator's state, then the rollout engines, started from the weights the
        run resumed (or starts) with."""
        super()._restore(ckpt)
        if ckpt is not None:
            self.rollout_rng.bit_generator.state = read_trainer_state(ckpt)["rollout_rng"]
        if self.dist.rank == 0:
            self.rewards = RewardFunctions(self.cfg.grpo.reward, self.cfg.grpo.reward_weights)
        self._start_rollouts()

    def trainer_state(self) -> dict[str, Any]:
        return {**super().trainer_state(), "rollout_rng": self.rollout_rng.bit_generator.state}

    def _engine_spec(self) -> EngineSpec:
        cfg, g = self.cfg, self.cfg.grpo
        tok = self.tokenizer_dir
        files = {n: (tok / n).read_bytes() for n in TOKENIZER_FILES if (tok / n).is_file()}
        # the learner's end-of-text ids, whatever the model directory's files say
        files["generation_config.json"] = json.dumps(
            {"eos_token_id": model_stop_ids(self.tokenizer, self.tokenizer_dir)}).encode()
        prompts = cfg.train.global_batch_size // g.group_size
        share = -(-prompts // max(1, g.rollout_workers)) * g.group_size
        device = g.rollout_device
        if cfg.lora.enabled and device == "auto":
            device = "cpu"  # the engine serves adapters on the CPU only
        options = {"dtype": g.rollout_dtype, "device": device, "max_batch_size": max(1, min(share, 256)),
                   "max_waiting": max(share, EVAL_PROMPTS) + 1, "max_seq_len": cfg.train.seq_len + 1,
                   "batch_wait_timeout_s": 0.0, "seed": cfg.train.seed}
        adapters = {}
        if cfg.lora.enabled:
            options.update(max_loras=1, max_lora_rank=cfg.lora.rank)
            adapters = {"rank": cfg.lora.rank, "scale": cfg.lora.alpha / cfg.lora.rank}
        return EngineSpec(self.model_args.to_dict(), files, options, g.max_new_tokens, g.temperature, g.top_p,
                          adapters)

    def _start_rollouts(self) -> None:
        """Start the rollout engines on the learner's current weights (collective: the weights gather on rank 0)."""
        g, lora = self.cfg.grpo, self.cfg.lora.enabled
        base = gather_policy(self.backend, self.groups, "base" if lora else "all")
        adapters = gather_policy(self.backend, self.groups, "adapters") if lora else None
        if self.dist.rank == 0:
            spec = self._engine_spec()
            if g.rollout_workers == 0:
                self.rollouts = LocalRollouts(spec)
            else:
                from moe_platform.post_train.rollout_workers import RayRollouts

                self.rollouts = RayRollouts(spec, g.rollout_workers, resource_amounts(g.rollout_resources),
                                            g.rollout_timeout_s)
            seconds = self.rollouts.start(base, adapters)
            self.log_event("rollouts", workers=g.rollout_workers, resources=g.rollout_resources, sync="adapters"
                           if lora else "weights", start_seconds=seconds, from_checkpoint=self.resumed_from)
        self.dist.barrier()

    def close_rollouts(self) -> None:
        if self.rollouts is not None:
            self.rollouts.close()
            self.rollouts = None

    def fit(self, stop_after: int | None = None):
        try:
            return super().fit(stop_after)
        finally:
            self.close_rollouts()

    # -- one round -----------------------------------------------------------------------------------------------

    def _round(self, ids: np.ndarray) -> dict[str, Any]:
        """Rank 0: generate and score the step's completions -> the round as numpy arrays, rows padded to
        seq_len + 1 tokens (group-major: completion k answers prompt ids[k // group_size])."""
        g, width = self.cfg.grpo, self.cfg.train.seq_len + 1
        size = g.group_size
        seeds = self.rollout_rng.integers(0, 2**63 - 1, size=len(ids) * size, dtype=np.int64)
        requests = [RolloutRequest(k, tuple(self.dataset.prompt(ids[k // size])), int(seeds[k]))
                    for k in range(len(ids) * size)]
        t0 = time.perf_counter()
        results = sorted(self.rollouts.generate(requests, group_size=size), key=lambda r: r.key)
        t1 = time.perf_counter()
        rows = [self.dataset.rows[ids[k // size]] for k in range(len(results))]
        where = [self.dataset.where[ids[k // size]] for k in range(len(results))]
        rewards, per_fn = self.rewards.score(rows, [r.text for r in results], where)
        advantages = group_advantages(torch.from_numpy(rewards), size).numpy()
        t2 = time.perf_counter()
        n = len(results)
        tokens = np.full((n, width), self.eos_id, dtype=np.int64)
        engine = np.full((n, width - 1), np.nan, dtype=np.float32)
        prompt_lens, lens = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        for k, (req, res) in enumerate(zip(requests, results, strict=True)):
            p, c = len(req.prompt_ids), len(res.token_ids)
            tokens[k, :p + c] = list(req.prompt_ids) + res.token_ids
            engine[k, p - 1:p - 1 + c] = res.logprobs
            prompt_lens[k], lens[k] = p, c
        return {"tokens": tokens, "prompt_lens": prompt_lens, "lens": lens, "advantages": advantages,
                "engine_logps": engine, "rewards": rewards, "per_fn": per_fn, "seeds": seeds,
                "texts": [r.text for r in results], "truncated": [r.finish_reason == "length" for r in results],
                "generate_seconds": t1 - t0, "score_seconds": t2 - t1, "restarts": self.rollouts.restarts}

    def _micro_batches(self, ids: np.ndarray) -> list[tuple]:
        """This rank's micro-batches of the step's completions as (inputs, (targets, advantages, side)); sets the
        loss scale (see GRPOLoss) so that the step's objective is the same on every layout."""
        cfg = self.cfg
        box = [self._round(ids) if self.dist.rank == 0 else None]
        if self.dist.distributed:
            torch.distributed.broadcast_object_list(box, src=0)
        rnd = self.last_round = box[0]
        n, mbs = len(rnd["tokens"]), cfg.train.micro_batch_size
        counted = int(rnd["lens"].sum())
        self.counted_targets = counted
        self.backend.loss_fn.scale = (n // mbs) / (counted if cfg.grpo.loss_agg == "token_mean" else n)
        # Rows as long as the round's longest sequence (in steps of 8 positions), not train.seq_len: the same on every
        # layout. A pipeline is told when that changes (DeepSpeed keeps its activation buffers' shapes otherwise).
        width = min(cfg.train.seq_len, -(-int((rnd["prompt_lens"] + rnd["lens"]).max() - 1) // 8) * 8)
        if self.layout.pp_enabled and width != self._width:
            self.backend.engine.reset_activation_shape()
        self._width = width
        local = self.sampler.shard(np.arange(n), *self.dp)
        batches = [self._micro_batch(rnd, m, width) for m in self.sampler.micro_batches(local, mbs)]
        if self.reference is not None:
            for (_, (_, _, side)), ref in zip(batches, self._reference_logps(batches), strict=True):
                side[..., REF] = ref.to(side.device, side.dtype)
        return batches

    def _micro_batch(self, rnd: dict[str, Any], rows: np.ndarray, width: int | None = None) -> tuple:
        """Completions `rows` of the round as (inputs, (targets, advantages, side)), `width` positions (all of
        train.seq_len by default)."""
        tokens = torch.from_numpy(rnd["tokens"][rows][:, :(width or self.cfg.train.seq_len) + 1])
        targets = tokens[:, 1:].clone()
        positions = torch.arange(targets.shape[1])[None, :]
        start = torch.from_numpy(rnd["prompt_lens"][rows])[:, None] - 1
        scored = (positions >= start) & (positions < start + torch.from_numpy(rnd["lens"][rows])[:, None])
        targets[~scored] = IGNORE_INDEX
        side = torch.full((*targets.shape, 3), float("nan"))
        side[..., ENGINE] = torch.from_numpy(rnd["engine_logps"][rows][:, :targets.shape[1]])
        advantages = torch.from_numpy(rnd["advantages"][rows]).float()
        to = self.device
        return tokens[:, :-1].to(to), (targets.to(to), advantages.to(to), side.to(to))

    def _reference_logps(self, batches: list[tuple]) -> list[torch.Tensor]:
        """Each micro-batch's per-token reference log-probabilities (zeros on pipeline stages before the last)."""
        loss_fn: GRPOLoss = self.backend.loss_fn
        loss_fn.mode = "logps"
        try:
            with self.reference.active():
                outputs = self.backend.eval_outputs(batches)
        finally:
            loss_fn.mode = "loss"
        return outputs if outputs is not None else [torch.zeros(t.shape) for _, (t, _, _) in batches]

    def _loss_totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """STATS summed and MAX_STATS maximised over every completion the loss saw this step, over all ranks (each
        counted by the ranks that compute the loss: tensor-parallel rank 0 of the last stage)."""
        loss_fn: GRPOLoss = self.backend.loss_fn
        sums = loss_fn.stats if loss_fn.stats is not None else torch.zeros(len(STATS), dtype=torch.float64)
        maxima = loss_fn.maxima if loss_fn.maxima is not None else torch.zeros(len(MAX_STATS), dtype=torch.float64)
        loss_fn.reset_stats()
        if not self.dist.distributed:
            return sums.cpu(), maxima.cpu()
        g = self.groups
        counts = g.tp_rank == 0 and g.pp_rank == g.layout.pp - 1
        sums = (sums if counts else torch.zeros_like(sums)).to(collective_device())
        maxima = maxima.to(collective_device())
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX)
        return sums.cpu(), maxima.cpu()

    def _sync(self) -> tuple[float, int]:
        """Bring the learner's new weights (LoRA: its adapters) to the rollout engines: (seconds, bytes moved)."""
        t0 = time.perf_counter()
        lora = self.cfg.lora.enabled
        state = gather_policy(self.backend, self.groups, "adapters" if lora else "all")
        moved = 0
        if self.dist.rank == 0:
            moved = self.rollouts.sync(None if lora else state, state if lora else None)
        return time.perf_counter() - t0, moved

    # -- steps and evaluation ------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        self.backend.loss_fn.reset_stats()
        rec = super().train_step()
        sync_seconds, moved = self._sync()
        sums, maxima = self._loss_totals()
        rnd = self.last_round
        rec.update(stats_metrics(sums, maxima, kl=self.reference is not None))
        learner_tokens = int(rnd["prompt_lens"].sum() + rnd["lens"].sum())
        generate, score = rnd["generate_seconds"], rnd["score_seconds"]
        learn = rec["step_time_s"] - generate - score
        step_time = rec["step_time_s"] + sync_seconds
        rewards = rnd["rewards"]
        groups = rewards.reshape(-1, self.cfg.grpo.group_size)
        rec.update({
            "reward": float(rewards.mean()), "reward_std": float(groups.std(axis=1, ddof=1).mean()),
            **{f"rewards/{spec}": float(v.mean()) for (spec, _), v in zip(self.reward_specs, rnd["per_fn"],
                                                                           strict=True)},
            "response_length": float(rnd["lens"].mean()), "truncated_fraction": float(np.mean(rnd["truncated"])),
            "generate_seconds": generate, "score_seconds": score, "learn_seconds": learn,
            "sync_seconds": sync_seconds, "sync_bytes": moved, "step_time_s": step_time,
            "rollout_tokens_per_s": float(rnd["lens"].sum()) / max(generate, 1e-9),
            "learner_tokens_per_s": learner_tokens / max(learn, 1e-9), "tokens_per_s": learner_tokens / step_time,
            "mfu": learner_tokens / step_time * self.flops_per_token / self.peak_flops,
            "completions": len(rewards), "rollout_restarts": rnd["restarts"], "rollout_seed": int(rnd["seeds"][0]),
            "row_width": self._width,
        })
        if self.dist.rank == 0 and rnd["restarts"] > self._seen_restarts:
            self.log_event("rollout_worker_replaced", replaced=rnd["restarts"] - self._seen_restarts,
                           total=rnd["restarts"])
            self._seen_restarts = rnd["restarts"]
        return rec

    @torch.no_grad()
    def eval_record(self) -> dict[str, Any]:
        """Rank 0: `val_reward`, the mean reward of one greedy completion of each of up to EVAL_PROMPTS held-out
        prompts (the same prompts at every eval step)."""
        val = self.dataset.val_ids()[:EVAL_PROMPTS]
        if self.dist.rank != 0 or not len(val):
            return {}
        requests = [RolloutRequest(k, tuple(self.dataset.prompt(i)), k) for k, i in enumerate(val)]
        results = sorted(self.rollouts.generate(requests, greedy=True), key=lambda r: r.key)
        rewards, _ = self.rewards.score([self.dataset.rows[i] for i in val], [r.text for r in results],
                                        [self.dataset.where[i] for i in val])
        return {"val_reward": float(rewards.mean())}

    def evaluate(self, max_batches: int = 8) -> float | None:
        return self.eval_record().get("val_reward")
