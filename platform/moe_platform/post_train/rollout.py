"""Rollouts from our serving engine: what one generation round asks for and gets, the engine that answers it, and the
in-process pool (grpo.rollout_workers = 0). The Ray pool (`rollout_workers.RayRollouts`) runs the same
`RolloutEngine` in Ray actors.

Every completion has its own sampling seed, drawn by the learner from the run's rollout generator (its state is
part of every checkpoint), and the engine samples each request from its own seeded generator: a completion is the
same whichever worker makes it and whatever shares its batch, so a round that a replaced worker makes again, or a
resumed run, gives the same rollouts.

The weights an engine holds change only between rounds: `load_weights` swaps the learner's full weights in
(`Engine.update_weights`: the tensors become the parameters, without a copy when they already have the engine's
dtype), `load_adapters` writes the learner's LoRA adapters over the policy's adapter slot (`Engine.put_adapter`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from moe_platform.checkpoint.adapters import Adapters
from moe_platform.model.args import ModelArgs
from moe_platform.serving.engine import Engine, SamplingParams

POLICY_ADAPTER = "policy"  # the adapter slot the policy's LoRA adapters live in on a rollout engine


@dataclass(frozen=True)
class RolloutRequest:
    key: int  # its place in the round
    prompt_ids: tuple[int, ...]
    seed: int


@dataclass
class RolloutResult:
    key: int
    token_ids: list[int]  # the completion, its end-of-text token included when it stopped there
    logprobs: list[float]  # the engine's log-probability of each, untempered (as vLLM reports them)
    text: str
    finish_reason: str


@dataclass
class EngineSpec:
    """What a rollout engine is built from besides its weights (picklable: it travels to Ray actors)."""

    model_args: dict
    files: dict[str, bytes]  # tokenizer files and a generation_config.json with the learner's end-of-text ids
    options: dict  # EngineConfig options
    max_new_tokens: int
    temperature: float
    top_p: float
    adapters: dict = field(default_factory=dict)  # LoRA: {"rank", "scale"}; empty: full weights


class RolloutEngine:
    """One serving engine making rollouts, stepped on the caller's thread (no background loop)."""

    def __init__(self, spec: EngineSpec, weights: Mapping[str, torch.Tensor], keepalive: object = None):
        self.spec = spec
        self.engine = Engine.from_state_dict(ModelArgs.from_dict(spec.model_args), weights, spec.files,
                                             "grpo-policy", keepalive=keepalive, **spec.options)
        self.adapter = POLICY_ADAPTER if spec.adapters else None

    def load_weights(self, state: Mapping[str, torch.Tensor], keepalive: object = None) -> int:
        return self.engine.update_weights(state, keepalive)

    def load_adapters(self, tensors: Mapping[str, torch.Tensor]) -> int:
        adapters = Adapters(dict(tensors), self.spec.adapters["rank"], self.spec.adapters["scale"], None, "")
        self.engine.put_adapter(POLICY_ADAPTER, adapters, "learner")
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def params(self, seed: int, greedy: bool = False) -> SamplingParams:
        s = self.spec
        return SamplingParams(max_tokens=s.max_new_tokens, temperature=0.0 if greedy else s.temperature,
                              top_p=s.top_p, seed=seed, logprobs=0)

    def generate(self, requests: Sequence[RolloutRequest], greedy: bool = False) -> list[RolloutResult]:
        """Every request's completion, batched on the engine (continuous batching, prompts of a group sharing their
        prefix's KV blocks)."""
        engine = self.engine
        by_id = {engine.add_request(list(r.prompt_ids), self.params(r.seed, greedy), adapter=self.adapter): r
                 for r in requests}
        out = {rid: RolloutResult(r.key, [], [], "", "") for rid, r in by_id.items()}
        while engine.has_unfinished():
            for o in engine.step():
                if o.error is not None:
                    raise o.failure()
                res = out[o.request_id]
                res.token_ids += o.token_ids
                res.logprobs += [lp for lp, _ in o.logprobs or []]
                res.text += o.text
                if o.finished:
                    res.finish_reason = o.finish_reason or ""
        return [out[rid] for rid in by_id]


class LocalRollouts:
    """grpo.rollout_workers = 0: one rollout engine in this process. The learner's tensors are copied in (the
    engine must keep the round's weights while the learner's change in place)."""

    workers = 0

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.engine: RolloutEngine | None = None
        self.restarts = 0

    def start(self, weights: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor] | None) -> float:
        t0 = time.perf_counter()
        self.engine = RolloutEngine(self.spec, {n: t.detach().clone() for n, t in weights.items()})
        if adapters is not None:
            self.engine.load_adapters({n: t.detach().clone() for n, t in adapters.items()})
        return time.perf_counter() - t0

    def sync(self, weights: Mapping[str, torch.Tensor] | None, adapters: Mapping[str, torch.Tensor] | None) -> int:
        """Swap the learner's new weights (or only its adapters) in; returns the bytes moved."""
        moved = 0
        if weights is not None:
            moved += self.engine.load_weights({n: t.detach().clone() for n, t in weights.items()})
        if adapters is not None:
            moved += self.engine.load_adapters({n: t.detach().clone() for n, t in adapters.items()})
        return moved

    def generate(self, requests: Sequence[RolloutRequest], greedy: bool = False,
                 group_size: int = 1) -> list[RolloutResult]:
        return self.engine.generate(requests, greedy)

    def close(self) -> None:
        self.engine = None
