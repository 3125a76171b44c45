"""Canary and blue-green rollouts between model versions of one Serve app, gated on live metrics (no Ray here).

A `Rollout` is the state machine of an app's rollouts. It is fed by the app's replicas (`sync`: what versions each
one serves and per-version request statistics since its last sync) and answers with the traffic split they should
apply. It moves the canary's weight through `steps` (e.g. 5, 25, 50, 100 percent), holding each for `dwell_s`:

1. loading: every live replica must report the new version loaded and healthy before any traffic moves (a version
   given by `source` is loaded by the replicas on demand);
2. probing (with a quality gate): the router scores a held-out prompt set on both versions; a mean loss more than
   `max_loss_increase` above the stable version's fails the gate;
3. evaluating (with an eval gate): one replica, picked by the controller (another if it goes away), runs an
   lm-evaluation-harness task on both versions in the background; a score more than `max_drop` worse than the
   stable version's fails the gate;
4. dwell: the canary's error rate, p99 time to first token and p99 latency over the step must stay within the
   bounds against the stable version's (measured since the rollout started) - judged as soon as `min_requests`
   canary requests have finished, and again at the end of the dwell, which waits for `min_requests` if need be.

The probe and the evaluation run again at every step, before its traffic moves. Any failed gate rolls back to 0%
canary at once and records why; passing the last step (100%) promotes the new version. Blue-green is one step of
100% after loading: the switch happens at a request boundary (each request reads the split once) and the old version
finishes what it accepted. Every event goes to `audit` (the JSONL audit log). The gates themselves:
serving/rollout_gates.py.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moe_platform.serving.rollout_gates import (
    MAX_PROBE_PROMPTS,
    EvalGate,
    Gates,
    QualityProbe,
    Window,
    judge,
    judge_eval,
    judge_probe,
)
from moe_platform.serving.traffic import PERCENT, TrafficSplit, UnknownVersionError

DEFAULT_STEPS = (5, 25, 50, 100)
STATES = ("idle", "running", "promoted", "rolled_back", "aborted")  # index = the value of the state metric
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class RolloutError(ValueError):
    """A rollout request that cannot be carried out; `status` is the HTTP status an admin route answers with."""

    status = 400
    code = "invalid_rollout"


class RolloutConflictError(RolloutError):
    status = 409
    code = "rollout_in_progress"


class VersionMismatchError(RolloutError):
    code = "version_base_mismatch"


def parse_duration(value: str | float | int) -> float:
    """Seconds from 600, "600", "30s", "10m", "1.5h" or "250ms"."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 10m, 1h)")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be >= 0 seconds, got {value!r}")
    return seconds


class RolloutSpec(BaseModel):
    """What `rollout start` asks for (the `rollout:` section of a Serve app's user_config, the CLI, the admin
    route)."""

    model_config = ConfigDict(extra="forbid")
    to: str = Field(pattern=r"^[A-Za-z0-9._-]+$", description="the version rolled out")
    source: str | None = Field(None, description="where replicas load `to` from if they do not serve it yet: "
                                                 "an export directory or registry://NAME@VERSION")
    steps: list[int] = Field(default_factory=lambda: list(DEFAULT_STEPS), description="canary percent per step")
    dwell_s: float = Field(600.0, description="how long each step holds (seconds, or e.g. '10m')")
    blue_green: bool = Field(False, description="switch all traffic at once after loading and health checks")
    gates: Gates = Field(default_factory=Gates)

    @field_validator("dwell_s", mode="before")
    @classmethod
    def _dwell(cls, value):
        return parse_duration(value)

    @model_validator(mode="after")
    def _check_steps(self):
        if self.blue_green:
            if "steps" in self.model_fields_set and self.steps != [PERCENT]:
                raise ValueError(f"a blue-green rollout has one step of {PERCENT}%; do not also give steps")
            self.steps = [PERCENT]
        if not self.steps or any(s < 1 or s > PERCENT for s in self.steps) or self.steps != sorted(set(self.steps)):
            raise ValueError(f"steps must be increasing whole percentages in 1..{PERCENT}, got {self.steps}")
        if self.steps[-1] != PERCENT:
            raise ValueError(f"the last step must be {PERCENT} (the new version takes all traffic), got {self.steps}")
        return self

    @classmethod
    def parse(cls, data: Mapping) -> RolloutSpec:
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            raise RolloutError(f"invalid rollout: {_errors(e)}") from None


def _errors(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'rollout'}: {err['msg'].removeprefix('Value error, ')}"
                     for err in e.errors())


@dataclass
class Replica:
    seen: float
    versions: dict[str, dict]  # version -> {"ready": bool, "base": fingerprint, "source": ...}
    version: str  # the replica's own base version (args.version)


class Rollout:
    """The rollout state of one Serve app. Not thread-safe: its owner serialises calls (the Ray actor does)."""

    def __init__(self, app: str, audit: Callable[[dict], None] = lambda event: None, clock=time.time,
                 replica_ttl_s: float = 10.0, seed: int = 0):
        self.app = app
        self.audit = audit
        self.clock = clock
        self.replica_ttl_s = replica_ttl_s
        self._rng = random.Random(seed)
        self.state = "idle"
        self.spec: RolloutSpec | None = None
        self.stable: str | None = None  # the version that takes traffic when no rollout moves it
        self.weights: dict[str, int] | None = None  # None: replicas keep the split of their own config
        self.step = -1
        self.phase = ""  # loading | probing | dwell
        self.step_started = 0.0
        self.reason = ""
        self.sources: dict[str, str] = {}  # versions replicas load on demand -> their source
        self.generation = 0  # bumped on every change of the split
        self.declared: str | None = None  # the last `rollout:` section applied from user_config (as JSON)
        self.replicas: dict[str, Replica] = {}
        self.probe: dict | None = None  # {"id", "prompts", "versions"} while one is out; results land in `losses`
        self.losses: dict[str, float] | None = None
        # {"id", "versions", "replica", task...} while an evaluation is out (one replica runs it); its result lands in
        # `evaluation`
        self.eval_job: dict | None = None
        self.evaluation: dict | None = None
        self.canary = Window()
        self.baseline = Window()
        self.rollbacks = 0
        self.last_refusal = ""
        self._refused: dict[str, float] = {}  # reason -> when it was last reported

    def restore(self, last: Mapping) -> None:
        """Pick up where the audit log's last event left the app (a restarted controller): a finished rollout's split
        stays; one that was running when the controller went away is rolled back to its stable version."""
        if last.get("weights") is None or last.get("stable") is None:
            return
        self.stable, self.weights, self.generation = last["stable"], dict(last["weights"]), 1
        self.sources = dict(last.get("sources") or {})
        self.state = last.get("state") if last.get("state") in STATES else "idle"
        if self.state == "running":
            self.state, self.reason = "aborted", "the rollout controller restarted during the rollout"
            self._set_weights({self.stable: PERCENT})
            self._event("abort", "controller", self.reason)

    # -- replicas ------------------------------------------------------------------------------------------------
    def sync(self, replica: str, version: str, versions: Mapping[str, dict], stats: Mapping[str, Mapping],
             probe: Mapping | None = None, evaluation: Mapping | None = None) -> dict:
        """A replica's report (its versions, per-version statistics since its last sync, a probe result, an
        evaluation result) -> what it should do: the split (None: its own), versions to load, a probe to run, an
        evaluation to run (given to one replica at a time)."""
        now = self.clock()
        self.replicas = {k: r for k, r in self.replicas.items() if now - r.seen <= 10 * self.replica_ttl_s}
        self.replicas[replica] = Replica(now, {k: dict(v) for k, v in versions.items()}, version)
        if self.state == "running":
            for name, delta in stats.items():
                if name == self.spec.to and self.phase == "dwell":
                    self.canary.add(delta, self._rng)
                elif name == self.stable:
                    self.baseline.add(delta, self._rng)
            if probe and self.probe and probe.get("id") == self.probe["id"]:
                self.losses = {k: float(v) for k, v in probe.get("losses", {}).items()}
            job = self.eval_job
            if evaluation and job and evaluation.get("id") == job["id"] and self.evaluation is None:
                self.evaluation = dict(evaluation)
        self.tick()
        answer = {"generation": self.generation, "weights": self.weights, "sources": dict(self.sources)}
        if self.probe is not None and self.losses is None:
            answer["probe"] = self.probe
        job = self.eval_job
        if job is not None and self.evaluation is None:
            if job["replica"] not in self.live():  # not given out yet, or its replica went away: this one runs it
                job["replica"] = replica
            if job["replica"] == replica:
                answer["evaluation"] = {k: v for k, v in job.items() if k != "replica"}
        return answer

    def live(self) -> dict[str, Replica]:
        now = self.clock()
        return {k: r for k, r in self.replicas.items() if now - r.seen <= self.replica_ttl_s}

    def known_versions(self) -> dict[str, dict]:
        """Versions the live replicas serve (or load), with what they report about them."""
        known: dict[str, dict] = {}
        for r in self.live().values():
            for name, info in r.versions.items():
                known.setdefault(name, info)
        return known

    def _base_version(self) -> str | None:
        if self.stable:
            return self.stable
        live = self.live()
        return next(iter(live.values())).version if live else None

    # -- commands ------------------------------------------------------------------------------------------------
    def start(self, spec: RolloutSpec, by: str) -> dict:
        if self.state == "running":
            raise RolloutConflictError(f"a rollout to {self.spec.to!r} is already running (step "
                                       f"{self.step + 1}/{len(self.spec.steps)}); promote or abort it first")
        live = self.live()
        if not live:
            raise RolloutError(f"no replica of app {self.app!r} has reported yet; is it deployed and running?")
        stable = self._base_version()
        known = self.known_versions()
        if spec.to == stable:
            raise RolloutError(f"version {spec.to!r} already takes the traffic; roll out another version")
        if spec.to not in known and spec.source is None:
            raise UnknownVersionError(f"unknown version {spec.to!r}: the app serves {sorted(known)}; give its "
                                      f"source (an export directory or registry://NAME@VERSION) to load it")
        if spec.to in known and spec.source is not None and known[spec.to].get("source") not in (None, spec.source):
            raise RolloutError(f"version {spec.to!r} is already served from another source; choose another version "
                               f"name")
        ours, theirs = known.get(stable, {}).get("base"), known.get(spec.to, {}).get("base")
        if ours and theirs and ours != theirs:
            raise VersionMismatchError(f"version {spec.to!r} is for another base model than {stable!r}: "
                                       f"{_difference(theirs, ours)}")
        self.spec, self.stable, self.state, self.reason = spec, stable, "running", ""
        self.step, self.canary, self.baseline = -1, Window(), Window()
        if spec.source is not None:
            self.sources[spec.to] = spec.source
        self._event("start", by, f"{'blue-green' if spec.blue_green else 'canary'} rollout {stable} -> {spec.to}",
                    steps=spec.steps, dwell_s=spec.dwell_s, source=spec.source)
        self._enter_step(0)
        self.tick()
        return self.status()

    def declare(self, section: Mapping | None, by: str) -> dict:
        """Apply a `rollout:` section from the app's config: start it unless this same section was already applied
        (every replica, and every restart of one, hands it over). A section that conflicts is recorded, not
        applied."""
        key = json.dumps(section, sort_keys=True) if section else None
        if key == self.declared:
            return self.status()
        self.declared = key
        if section is None:
            return self.status()
        try:
            return self.start(RolloutSpec.parse(section), by)
        except RolloutError as e:
            return self.refuse(str(e), by, spec=dict(section))

    def refuse(self, reason: str, by: str, **details) -> dict:
        """Record a change of the app's config that was not applied. Every replica reports it: the same reason is
        recorded once a minute."""
        now = self.clock()
        if now - self._refused.get(reason, -math.inf) > 60:
            self._event("refused", by, reason, **details)
        self._refused[reason] = now
        self.last_refusal = reason
        return self.status()

    def promote(self, by: str, reason: str = "promoted by hand") -> dict:
        self._need_running("promote")
        self._finish("promoted", by, reason)
        return self.status()

    def abort(self, by: str, reason: str = "aborted by hand") -> dict:
        self._need_running("abort")
        self._rollback("aborted", by, reason)
        return self.status()

    def set_split(self, weights: Mapping[str, int], by: str) -> dict:
        """An operator's split for the whole app (the admin route), kept until the next rollout or config split; the
        version with the most traffic becomes the stable one."""
        if self.state == "running":
            raise RolloutConflictError(f"a rollout to {self.spec.to!r} is running and owns the traffic split; "
                                       f"promote or abort it first")
        try:
            split = TrafficSplit.of(weights, self.known_versions())
        except UnknownVersionError:
            raise
        except ValueError as e:
            raise RolloutError(str(e)) from None
        self._set_weights(split.as_dict())
        self.stable = max(split.weights, key=lambda item: item[1])[0]
        self._event("traffic", by, f"traffic split set to {self.weights}")
        return self.status()

    def set_traffic(self, weights: Mapping[str, int], by: str) -> dict:
        """An operator's split (user_config.traffic) outside a rollout: replicas go back to their own config."""
        if self.state == "running":
            raise RolloutConflictError(f"a rollout to {self.spec.to!r} is running and owns the traffic split; "
                                       f"promote or abort it first")
        if self.weights is not None:
            self.weights, self.state = None, "idle"
            self.generation += 1
            self._event("traffic", by, "the traffic split of the app's config applies again", weights=dict(weights))
        return self.status()

    def _need_running(self, what: str) -> None:
        if self.state != "running":
            raise RolloutError(f"no rollout is running to {what} (state: {self.state})")

    # -- the state machine ---------------------------------------------------------------------------------------
    def tick(self) -> None:
        if self.state != "running":
            return
        spec, now = self.spec, self.clock()
        if self.phase == "loading":
            live = self.live()
            not_ready = sorted(k for k, r in live.items() if not r.versions.get(spec.to, {}).get("ready"))
            failed = [r.versions[spec.to]["error"] for r in live.values() if r.versions.get(spec.to, {}).get("error")]
            if failed:
                return self._rollback("rolled_back", "controller", f"version {spec.to!r} failed to load: {failed[0]}")
            theirs = next((r.versions[spec.to].get("base") for r in live.values() if spec.to in r.versions), None)
            ours = self.known_versions().get(self.stable, {}).get("base")
            if ours and theirs and ours != theirs:
                return self._rollback("rolled_back", "controller", f"version {spec.to!r} is for another base "
                                      f"model than {self.stable!r}: {_difference(theirs, ours)}")
            if live and not not_ready:
                self._event("ready", "controller", f"{spec.to} loaded and healthy on {len(live)} replica(s)")
                self._probe_or_move()
            return
        if self.phase == "probing":
            if self.losses is None:
                return
            failure = judge_probe(spec.gates.quality, self.losses, self.stable, spec.to)
            self._event("gate", "controller", failure or "quality probe passed", gate="quality", passed=not failure,
                        losses=self.losses)
            if failure:
                return self._rollback("rolled_back", "controller", failure)
            self.probe = None
            self._evaluate_or_move()
            return
        if self.phase == "evaluating":
            if self.evaluation is None:
                return
            gate, result = spec.gates.eval, self.evaluation
            failure = judge_eval(gate, result, self.stable, spec.to)
            self._event("gate", "controller", failure or f"eval gate passed ({gate.task} {result.get('metric')})",
                        gate="eval", passed=not failure, task=gate.task, metric=result.get("metric"),
                        scores=result.get("scores"), documents=result.get("documents"), error=result.get("error"))
            if failure:
                return self._rollback("rolled_back", "controller", failure)
            self.eval_job = None
            self._move()
            return
        failure = judge(spec.gates, self.canary, self.baseline)
        if failure:
            self._event("gate", "controller", failure, gate="metrics", passed=False, canary=self.canary.summary(),
                        stable=self.baseline.summary())
            return self._rollback("rolled_back", "controller", failure)
        if now - self.step_started < spec.dwell_s or self.canary.requests < spec.gates.min_requests:
            return
        self._event("gate", "controller", f"step {self.step + 1}/{len(spec.steps)} held its gates", gate="metrics",
                    passed=True, canary=self.canary.summary(), stable=self.baseline.summary())
        if self.step + 1 == len(spec.steps):
            self._finish("promoted", "controller", f"all {len(spec.steps)} steps passed")
        else:
            self._enter_step(self.step + 1)
            self._probe_or_move()

    def _enter_step(self, index: int) -> None:
        self.step = index
        self.phase = "loading" if index == 0 else ("probing" if self.spec.gates.quality else "dwell")
        self.losses = None

    def _probe_or_move(self) -> None:
        if self.spec.gates.quality:
            self.phase = "probing"
            self.probe = {"id": f"{self.generation}-{self.step}-{self.clock()}", "prompts":
                          self.spec.gates.quality.prompts, "versions": [self.stable, self.spec.to]}
            self.losses = None
        else:
            self._evaluate_or_move()

    def _evaluate_or_move(self) -> None:
        gate: EvalGate | None = self.spec.gates.eval
        if gate is None:
            return self._move()
        self.phase, self.evaluation = "evaluating", None
        self.eval_job = {"id": f"eval-{self.generation}-{self.step}-{self.clock()}", "replica": None,
                         "versions": [self.stable, self.spec.to], **gate.model_dump(exclude={"max_drop"})}

    def _move(self) -> None:
        weight = self.spec.steps[self.step]
        self._set_weights({self.stable: PERCENT - weight, self.spec.to: weight})
        self.phase, self.step_started, self.canary = "dwell", self.clock(), Window()
        self._event("step", "controller", f"{self.spec.to} at {weight}%", step=self.step + 1)

    def _finish(self, state: str, by: str, reason: str) -> None:
        self._set_weights({self.spec.to: PERCENT})
        self.state, self.reason, self.stable, self.probe, self.phase = state, reason, self.spec.to, None, ""
        self.eval_job = None
        self._event("promote", by, reason)

    def _rollback(self, state: str, by: str, reason: str) -> None:
        self._set_weights({self.stable: PERCENT})
        self.state, self.reason, self.probe, self.phase, self.eval_job = state, reason, None, "", None
        if state == "rolled_back":
            self.rollbacks += 1
        self._event("rollback" if state == "rolled_back" else "abort", by, reason)

    def _set_weights(self, weights: dict[str, int]) -> None:
        TrafficSplit.of(weights, weights)  # whole percent summing to 100
        self.weights = weights
        self.generation += 1

    def _event(self, event: str, by: str, reason: str, **details) -> None:
        self.audit({"time": self.clock(), "app": self.app, "event": event, "by": by, "reason": reason,
                    "version": self.spec.to if self.spec else None, "stable": self.stable, "state": self.state,
                    "weights": self.weights, **({"sources": dict(self.sources)} if self.sources else {}),
                    **{k: v for k, v in details.items() if v is not None}})

    def status(self) -> dict:
        spec = self.spec
        waiting = ""
        if self.state == "running" and self.phase == "dwell":
            left = spec.dwell_s - (self.clock() - self.step_started)
            short = spec.gates.min_requests - self.canary.requests
            waiting = f"{max(0.0, left):.0f} s of dwell left" + (f", {short} more canary requests" if short > 0
                                                                   else "")
        return {"app": self.app, "state": self.state, "phase": self.phase, "stable": self.stable,
                "to": spec.to if spec else None, "step": self.step + 1 if spec else 0,
                "steps": spec.steps if spec else [], "dwell_s": spec.dwell_s if spec else None,
                "blue_green": spec.blue_green if spec else False, "weights": self.weights, "reason": self.reason,
                "waiting": waiting, "canary": self.canary.summary(), "baseline": self.baseline.summary(),
                "losses": self.losses, "evaluation": self.evaluation, "replicas": len(self.live()),
                "versions": sorted(self.known_versions()),
                "rollbacks": self.rollbacks, "generation": self.generation, "last_refusal": self.last_refusal}


def _difference(theirs: Mapping, ours: Mapping) -> str:
    return ", ".join(f"{key} {theirs.get(key)!r} vs {ours.get(key)!r}" for key in sorted(set(theirs) | set(ours))
                     if theirs.get(key) != ours.get(key))


def read_probe_file(section: Mapping, base_dir: Path | str = ".") -> dict:
    """A rollout section with `gates.quality.file` (held-out texts, separated by blank lines; relative to
    `base_dir`) turned into `gates.quality.prompts`; other sections come back as they are."""
    quality = (section.get("gates") or {}).get("quality") if isinstance(section, Mapping) else None
    if not isinstance(quality, Mapping) or "file" not in quality:
        return dict(section) if isinstance(section, Mapping) else section
    path = Path(base_dir) / Path(str(quality["file"])).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RolloutError(f"gates.quality.file: cannot read the probe prompts {path}: {e}") from None
    prompts = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()][:MAX_PROBE_PROMPTS]
    if not prompts:
        raise RolloutError(f"gates.quality.file: {path} holds no text")
    rest = {k: v for k, v in quality.items() if k != "file"}
    return {**section, "gates": {**section["gates"], "quality": {**rest, "prompts": prompts}}}


def known_split(weights: Mapping[str, int] | None, served: Iterable[str]) -> TrafficSplit | None:
    """The controller's split as a replica applies it: None when there is none or it names a version the replica
    does not serve (yet)."""
    if weights is None:
        return None
    try:
        return TrafficSplit.of(weights, served)
    except ValueError:
        return None


__all__ = ["DEFAULT_STEPS", "STATES", "EvalGate", "Gates", "QualityProbe", "Rollout", "RolloutConflictError",
           "RolloutError", "RolloutSpec", "VersionMismatchError", "Window", "judge", "judge_eval", "judge_probe",
           "known_split", "parse_duration", "read_probe_file"]
