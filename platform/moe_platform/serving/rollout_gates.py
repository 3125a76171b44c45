"""The gates a canary must hold against the stable version during a rollout (serving/rollout.py), and how each is
judged: live request metrics (error rate, p99 time to first token and latency over a window), the quality probe (mean
loss on held-out texts) and the eval gate (an lm-evaluation-harness task scored on both versions). No Ray here."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROBE_PROMPTS = 256
_MAX_SAMPLES = 20_000  # latency samples kept per version and window (uniform reservoir)


class QualityProbe(BaseModel):
    """Mean next-token loss of both versions on held-out prompts, scored by the router at every step."""

    model_config = ConfigDict(extra="forbid")
    prompts: list[str] = Field(min_length=1, max_length=MAX_PROBE_PROMPTS, description="held-out texts")
    max_loss_increase: float = Field(0.1, ge=0, description="canary mean loss - stable mean loss allowed (nats)")

    @field_validator("prompts")
    @classmethod
    def _texts(cls, value: list[str]) -> list[str]:
        if not all(text.strip() for text in value):
            raise ValueError("probe prompts must be non-empty texts")
        return value


class EvalGate(BaseModel):
    """An lm-evaluation-harness task scored on both versions (by one replica, in the background) before traffic
    moves at every step; the canary may score at most `max_drop` worse than the stable version."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$", description="the task's name (a local YAML task)")
    include_path: str | None = Field(None, description="the directory of the task's YAML (and its data) on the "
                                                       "replicas' machines; relative to the app's directory")
    limit: int | None = Field(None, ge=1, description="documents scored per version at most (default: all)")
    metric: str | None = Field(None, description="the metric compared, e.g. acc or acc_norm (default: the task's "
                                                 "first)")
    max_drop: float = Field(0.02, ge=0, description="how much worse the canary may score (in the metric's units; "
                                                    "lower for a higher-is-better metric, higher otherwise)")


class Gates(BaseModel):
    """Bounds the canary must hold against the stable version at every step."""

    model_config = ConfigDict(extra="forbid")
    max_error_rate_increase: float = Field(0.01, ge=0, le=1, description="canary 5xx fraction - stable's")
    max_p99_ttft_ratio: float | None = Field(2.0, gt=0, description="canary p99 time to first token / stable's")
    max_p99_latency_ratio: float | None = Field(1.5, gt=0, description="canary p99 request latency / stable's")
    min_requests: int = Field(20, ge=1, description="finished canary requests a step needs before it is judged")
    quality: QualityProbe | None = Field(None, description="optional quality probe")
    eval: EvalGate | None = Field(None, description="optional lm-evaluation-harness task gate")


@dataclass
class Window:
    """Finished requests of one version over a time window: counts and (sampled) latencies."""

    requests: int = 0
    errors: int = 0
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    _seen: dict[str, int] = field(default_factory=lambda: {"latency": 0, "ttft": 0})

    def add(self, delta: Mapping, rng: random.Random) -> None:
        self.requests += int(delta.get("requests", 0))
        self.errors += int(delta.get("errors", 0))
        for key in ("latency", "ttft"):
            samples = getattr(self, key)
            for value in delta.get(key, ()):
                self._seen[key] += 1
                if len(samples) < _MAX_SAMPLES:
                    samples.append(float(value))
                else:
                    slot = rng.randrange(self._seen[key])
                    if slot < _MAX_SAMPLES:
                        samples[slot] = float(value)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def p99(self, key: str) -> float | None:
        samples = sorted(getattr(self, key))
        return samples[min(len(samples) - 1, math.ceil(0.99 * len(samples)) - 1)] if samples else None

    def summary(self) -> dict:
        return {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 4),
                "p99_latency_s": _round(self.p99("latency")), "p99_ttft_s": _round(self.p99("ttft"))}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def judge(gates: Gates, canary: Window, stable: Window) -> str | None:
    """Why the canary fails its gates against the stable version, or None while it holds them (or cannot be judged
    yet: fewer than `min_requests` canary requests)."""
    if canary.requests < gates.min_requests:
        return None
    if canary.error_rate - stable.error_rate > gates.max_error_rate_increase:
        return (f"error rate {canary.error_rate:.3f} over {canary.requests} requests exceeds the stable version's "
                f"{stable.error_rate:.3f} by more than {gates.max_error_rate_increase}")
    for key, bound, what in (("ttft", gates.max_p99_ttft_ratio, "time to first token"),
                             ("latency", gates.max_p99_latency_ratio, "latency")):
        ours, theirs = canary.p99(key), stable.p99(key)
        if bound is None or ours is None or theirs is None or len(getattr(stable, key)) < gates.min_requests:
            continue  # no baseline to compare with
        if ours > bound * theirs:
            return (f"p99 {what} {ours * 1e3:.1f} ms is {ours / theirs:.2f}x the stable version's "
                    f"{theirs * 1e3:.1f} ms (bound {bound}x)")
    return None


def judge_probe(probe: QualityProbe, losses: Mapping[str, float], stable: str, canary: str) -> str | None:
    """Why the quality probe fails (None when it passes)."""
    ours, theirs = losses.get(canary), losses.get(stable)
    if ours is None or theirs is None:
        return f"the quality probe returned no loss for {sorted({stable, canary} - set(losses))}"
    if not math.isfinite(ours) or ours - theirs > probe.max_loss_increase:
        return (f"quality probe: mean loss {ours:.4f} on {len(probe.prompts)} held-out prompts is "
                f"{ours - theirs:+.4f} against the stable version's {theirs:.4f} (bound +{probe.max_loss_increase})")
    return None



def judge_eval(gate: EvalGate, result: Mapping, stable: str, canary: str) -> str | None:
    """Why the eval gate fails (None when it passes). `result`: a replica's evaluation, {"scores": {version:
    score}, "metric", "higher_is_better"} or {"error": why}."""
    if result.get("error"):
        return f"eval gate: the task {gate.task!r} could not be scored: {result['error']}"
    scores = result.get("scores") or {}
    ours, theirs = scores.get(canary), scores.get(stable)
    if ours is None or theirs is None:
        return f"eval gate: no score for {sorted({stable, canary} - set(scores))}"
    drop = (theirs - ours) if result.get("higher_is_better", True) else (ours - theirs)
    if not math.isfinite(ours) or not math.isfinite(theirs) or drop > gate.max_drop:
        return (f"eval gate: {gate.task} {result.get('metric')} {ours:.4f} against the stable version's "
                f"{theirs:.4f} is {drop:.4f} worse (bound {gate.max_drop})")
    return None
