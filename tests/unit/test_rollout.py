"""The rollout state machine (moe_platform.serving.rollout): steps, dwell, gates, rollbacks, the audit trail and the
refusals, driven by replica reports on a settable clock."""

from __future__ import annotations

import json

import pytest

from moe_platform.serving.rollout import (
    Rollout,
    RolloutConflictError,
    RolloutError,
    RolloutSpec,
    VersionMismatchError,
    Window,
    parse_duration,
    read_probe_file,
)
from moe_platform.serving.traffic import UnknownVersionError

BASE = {"architecture": "MixtralForCausalLM", "vocab_size": 512, "tokenizer": "abc"}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def versions(ready=True, base=BASE, error=None) -> dict:
    canary = {"ready": ready, "base": base, **({"error": error} if error else {})}
    return {"v1": {"ready": True, "base": BASE}, "v2": canary}


def traffic(n: int, latency: float, errors: int = 0, ttft: float = 0.025) -> dict:
    return {"requests": n, "errors": errors, "latency": [latency] * n, "ttft": [ttft] * n}


@pytest.fixture
def setup():
    clock, events = Clock(), []
    rollout = Rollout("app", events.append, clock=clock)
    for replica in ("r1", "r2"):
        rollout.sync(replica, "v1", versions(), {})
    return rollout, clock, events


def sync_all(rollout, stats=None, probe=None) -> dict:
    return [rollout.sync(r, "v1", versions(), stats or {}, probe) for r in ("r1", "r2")][-1]


def spec(**kw) -> RolloutSpec:
    return RolloutSpec.parse({"to": "v2", "dwell_s": "30s", "gates": {"min_requests": 10}, **kw})


def test_a_good_canary_moves_through_every_step_and_is_promoted(setup):
    rollout, clock, events = setup
    status = rollout.start(spec(steps=[5, 50, 100]), "cli:ops")
    assert status["weights"] == {"v1": 95, "v2": 5} and status["step"] == 1  # every replica had v2 ready
    seen = []
    for _ in range(3):
        clock.now += 10
        answer = sync_all(rollout, {"v1": traffic(40, 0.10), "v2": traffic(10, 0.11)})
        assert rollout.state == "running" and answer["weights"] == seen[-1] if seen else True
        clock.now += 25  # past the dwell
        seen.append(sync_all(rollout, {"v2": traffic(2, 0.11)})["weights"])
    assert seen == [{"v1": 50, "v2": 50}, {"v1": 0, "v2": 100}, {"v2": 100}]
    assert rollout.state == "promoted" and rollout.stable == "v2"
    assert [e["event"] for e in events] == ["start", "ready", "step", "gate", "step", "gate", "step", "gate",
                                             "promote"]
    assert events[0]["by"] == "cli:ops" and events[-1]["by"] == "controller"
    json.dumps(events)  # the audit log's lines


def test_a_slow_canary_is_rolled_back_within_its_first_step(setup):
    rollout, clock, events = setup
    rollout.start(spec(), "cli:ops")
    clock.now += 5
    sync_all(rollout, {"v1": traffic(100, 0.10), "v2": traffic(4, 0.5)})
    assert rollout.state == "running"  # 8 canary requests < min_requests: not judged yet
    clock.now += 1
    answer = sync_all(rollout, {"v2": traffic(2, 0.5)})
    assert rollout.state == "rolled_back" and answer["weights"] == {"v1": 100}
    assert "p99 latency 500.0 ms is 5.00x" in rollout.reason and rollout.rollbacks == 1
    assert [e["event"] for e in events][-2:] == ["gate", "rollback"]
    assert events[-2]["canary"]["requests"] == 10 and events[-2]["passed"] is False


def test_errors_fail_the_gate_and_steps_wait_for_enough_canary_requests(setup):
    rollout, clock, _ = setup
    rollout.start(spec(), "cli:ops")
    clock.now += 60
    sync_all(rollout, {"v1": traffic(100, 0.1), "v2": traffic(3, 0.1)})
    assert rollout.state == "running" and "4 more canary requests" in rollout.status()["waiting"]
    sync_all(rollout, {"v2": traffic(3, 0.1, errors=1)})
    assert rollout.state == "rolled_back" and "error rate 0.167 over 12 requests" in rollout.reason


def test_the_quality_probe_gates_every_step_before_traffic_moves(setup):
    rollout, clock, events = setup
    rollout.start(spec(gates={"quality": {"prompts": ["a b c", "d e f"], "max_loss_increase": 0.1}}), "cli:ops")
    answer = sync_all(rollout)
    assert rollout.phase == "probing" and answer["weights"] is None and answer["probe"]["versions"] == ["v1", "v2"]
    probe_id = answer["probe"]["id"]
    sync_all(rollout, probe={"id": "stale", "losses": {"v1": 1.0, "v2": 1.0}})
    assert rollout.phase == "probing"
    answer = sync_all(rollout, probe={"id": probe_id, "losses": {"v1": 2.0, "v2": 2.05}})
    assert answer["weights"] == {"v1": 95, "v2": 5} and "probe" not in answer
    clock.now += 31
    sync_all(rollout, {"v1": traffic(50, 0.1), "v2": traffic(10, 0.1)})
    answer = sync_all(rollout)
    assert rollout.phase == "probing" and answer["weights"] == {"v1": 95, "v2": 5}  # the next step probes first
    sync_all(rollout, probe={"id": answer["probe"]["id"], "losses": {"v1": 2.0, "v2": 7.5}})
    assert rollout.state == "rolled_back" and rollout.weights == {"v1": 100}
    assert "mean loss 7.5000 on 2 held-out prompts is +5.5000" in rollout.reason
    assert events[-2]["gate"] == "quality" and events[-2]["losses"] == {"v1": 2.0, "v2": 7.5}


def test_the_eval_gate_scores_both_versions_on_one_replica_before_every_step(setup):
    """One replica at a time gets the evaluation (another when it goes away); a stale result is ignored; a pass
    moves traffic, the next step evaluates again, and a drop beyond max_drop rolls back with the scores."""
    rollout, clock, events = setup
    gate = {"task": "mc", "include_path": "tasks", "limit": 20, "max_drop": 0.05}
    rollout.start(spec(gates={"min_requests": 10, "eval": gate}), "cli:ops")
    first = rollout.sync("r1", "v1", versions(), {})
    assert rollout.phase == "evaluating" and first["weights"] is None
    job = first["evaluation"]
    assert job == {"id": job["id"], "versions": ["v1", "v2"], "task": "mc", "include_path": "tasks", "limit": 20,
                   "metric": None}
    assert "evaluation" not in rollout.sync("r2", "v1", versions(), {})  # one replica runs it
    clock.now += 11  # r1 went away: r2 takes the evaluation over
    assert rollout.sync("r2", "v1", versions(), {})["evaluation"] == job
    result = {"metric": "acc,none", "higher_is_better": True, "documents": 20}
    rollout.sync("r2", "v1", versions(), {}, evaluation={"id": "stale", "scores": {"v1": 0.9, "v2": 0.1}, **result})
    assert rollout.phase == "evaluating"
    answer = rollout.sync("r2", "v1", versions(), {},
                          evaluation={"id": job["id"], "scores": {"v1": 0.80, "v2": 0.78}, **result})
    assert answer["weights"] == {"v1": 95, "v2": 5} and "evaluation" not in answer
    assert events[-2]["gate"] == "eval" and events[-2]["passed"] and events[-2]["scores"] == {"v1": 0.8, "v2": 0.78}
    clock.now += 31
    rollout.sync("r2", "v1", versions(), {"v1": traffic(50, 0.1), "v2": traffic(10, 0.1)})
    answer = rollout.sync("r2", "v1", versions(), {})
    assert rollout.phase == "evaluating" and answer["weights"] == {"v1": 95, "v2": 5}  # the next step scores first
    again = answer["evaluation"]
    assert again["id"] != job["id"]
    rollout.sync("r2", "v1", versions(), {}, evaluation={"id": again["id"], "scores": {"v1": 0.8, "v2": 0.7},
                                                         **result})
    assert rollout.state == "rolled_back" and rollout.weights == {"v1": 100} and rollout.eval_job is None
    assert rollout.reason == ("eval gate: mc acc,none 0.7000 against the stable version's 0.8000 is 0.1000 worse "
                              "(bound 0.05)")
    assert events[-2]["passed"] is False and events[-2]["scores"] == {"v1": 0.8, "v2": 0.7}
    assert rollout.status()["evaluation"]["scores"] == {"v1": 0.8, "v2": 0.7}


@pytest.mark.parametrize("result, reason", [
    ({"scores": {"v1": 10.0, "v2": 10.5}, "metric": "word_perplexity,none", "higher_is_better": False},
     "word_perplexity,none 10.5000 against the stable version's 10.0000 is 0.5000 worse"),
    ({"error": "ValueError; the replica log says why"}, "could not be scored: ValueError"),
    ({"scores": {"v1": 0.5}, "metric": "acc,none"}, "no score for ['v2']"),
])
def test_the_eval_gate_fails_on_a_worse_lower_is_better_score_an_error_or_a_missing_score(setup, result, reason):
    rollout, _, _ = setup
    rollout.start(spec(gates={"eval": {"task": "ppl", "max_drop": 0.1}}), "cli:ops")
    job = rollout.sync("r1", "v1", versions(), {})["evaluation"]
    rollout.sync("r1", "v1", versions(), {}, evaluation={"id": job["id"], **result})
    assert rollout.state == "rolled_back" and reason in rollout.reason, rollout.reason


def test_traffic_waits_until_every_replica_has_the_version_ready(setup):
    rollout, clock, _ = setup
    rollout.sync("r2", "v1", {"v1": {"ready": True, "base": BASE}}, {})  # r2 does not serve v2 yet
    rollout.start(spec(blue_green=True, source="registry://m@2"), "admin")
    assert rollout.phase == "loading" and rollout.weights is None and rollout.sources == {"v2": "registry://m@2"}
    rollout.sync("r2", "v1", versions(ready=False), {})
    assert rollout.phase == "loading"
    rollout.sync("r2", "v1", versions(), {})
    assert rollout.weights == {"v1": 0, "v2": 100} and rollout.spec.steps == [100]  # blue-green: one switch
    clock.now += 11  # a replica that stops syncing no longer counts
    assert list(rollout.live()) == []


def test_a_version_that_fails_to_load_rolls_back(setup):
    rollout, _, _ = setup
    rollout.sync("r2", "v1", {"v1": {"ready": True, "base": BASE}}, {})
    rollout.start(spec(source="/exports/v2"), "admin")
    rollout.sync("r2", "v1", versions(ready=False, error="ValueError: no config.json"), {})
    assert rollout.state == "rolled_back" and "failed to load: ValueError: no config.json" in rollout.reason
    rollout.sync("r1", "v1", {"v1": {"ready": True, "base": BASE}}, {})
    rollout.sync("r2", "v1", {"v1": {"ready": True, "base": BASE}, "v3": {"ready": True, "base": {**BASE,
                 "vocab_size": 384}}}, {})
    with pytest.raises(VersionMismatchError, match=r"another base model than 'v1': vocab_size 384 vs 512"):
        rollout.start(spec(to="v3"), "admin")


def test_refusals_leave_the_running_split_alone(setup):
    rollout, _, events = setup
    with pytest.raises(UnknownVersionError, match=r"unknown version 'v9'.*serves \['v1', 'v2'\]"):
        rollout.start(spec(to="v9"), "cli")
    with pytest.raises(RolloutError, match="'v1' already takes the traffic"):
        rollout.start(spec(to="v1"), "cli")
    with pytest.raises(RolloutError, match="no rollout is running to promote"):
        rollout.promote("cli")
    rollout.sync("r1", "v1", versions(base={**BASE, "architecture": "Qwen3MoeForCausalLM"}), {})
    with pytest.raises(VersionMismatchError, match="architecture 'Qwen3MoeForCausalLM' vs 'MixtralForCausalLM'"):
        rollout.start(spec(), "cli")
    sync_all(rollout)
    with pytest.raises(RolloutError, match=r"must sum to 100, got 90"):
        rollout.set_split({"v1": 80, "v2": 10}, "admin")
    with pytest.raises(UnknownVersionError, match=r"unknown version\(s\) \['v9'\]"):
        rollout.set_split({"v1": 90, "v9": 10}, "admin")
    assert rollout.weights is None and events == []
    rollout.set_split({"v1": 30, "v2": 70}, "admin")
    assert (rollout.weights, rollout.stable, events[-1]["event"]) == ({"v1": 30, "v2": 70}, "v2", "traffic")
    rollout.set_split({"v1": 100}, "admin")
    rollout.start(spec(), "cli")
    before = (rollout.weights, rollout.generation)
    with pytest.raises(RolloutConflictError, match="already running"):
        rollout.start(spec(), "cli")
    with pytest.raises(RolloutConflictError, match="owns the traffic split"):
        rollout.set_traffic({"v1": 50, "v2": 50}, "serve deploy")
    with pytest.raises(RolloutConflictError, match="owns the traffic split"):
        rollout.set_split({"v1": 50, "v2": 50}, "admin")
    rollout.declare({"to": "v2", "steps": [50, 100]}, "serve deploy")  # recorded, not applied
    assert (rollout.weights, rollout.generation) == before and events[-1]["event"] == "refused"
    rollout.abort("cli", "looks wrong")
    assert rollout.state == "aborted" and rollout.weights == {"v1": 100} and rollout.rollbacks == 0
    assert rollout.set_traffic({"v1": 50, "v2": 50}, "serve deploy")["weights"] is None  # the config's split again


def test_a_declared_section_starts_once_and_a_restart_resumes_from_the_audit_log(setup):
    rollout, _, events = setup
    section = {"to": "v2", "steps": [100], "dwell_s": 0, "gates": {"min_requests": 1}}
    for _ in range(3):  # every replica (and every restart) hands the same section over
        rollout.declare(section, "serve deploy")
    assert [e["event"] for e in events].count("start") == 1
    for _ in range(2):
        rollout.refuse("user_config.traffic is not applied: weights must sum to 100", "serve deploy")
    assert [e["event"] for e in events].count("refused") == 1
    assert rollout.status()["last_refusal"].startswith("user_config.traffic")
    sync_all(rollout, {"v2": traffic(1, 0.1)})
    assert rollout.state == "promoted"
    restarted = Rollout("app", clock=Clock())
    restarted.restore(events[-1])
    assert (restarted.state, restarted.stable, restarted.weights) == ("promoted", "v2", {"v2": 100})
    mid = Rollout("app", events.append, clock=Clock())
    mid.restore({**events[-1], "state": "running", "stable": "v1", "weights": {"v1": 75, "v2": 25}})
    assert (mid.state, mid.weights) == ("aborted", {"v1": 100}) and "restarted" in events[-1]["reason"]


@pytest.mark.parametrize("bad, match", [
    ({"steps": [50, 25, 100]}, "increasing whole percentages"),
    ({"steps": [5, 50]}, "the last step must be 100"),
    ({"steps": [0, 100]}, "increasing whole percentages"),
    ({"blue_green": True, "steps": [5, 100]}, "one step of 100%"),
    ({"dwell_s": "ten minutes"}, "not a duration"),
    ({"to": "v 2"}, "to: String should match"),
    ({"gates": {"max_p99_latency_ratio": 0}}, "gates.max_p99_latency_ratio"),
    ({"gates": {"quality": {"prompts": []}}}, "gates.quality.prompts"),
    ({"gates": {"eval": {"task": "mc", "max_drop": -1}}}, "gates.eval.max_drop"),
    ({"gates": {"eval": {"task": "../x"}}}, "gates.eval.task"),
    ({"gate": {}}, "gate: Extra inputs are not permitted"),
])
def test_invalid_rollouts_name_what_is_wrong(bad, match):
    with pytest.raises(RolloutError, match=match):
        RolloutSpec.parse({"to": "v2", **bad})


def test_durations_windows_and_probe_files(tmp_path):
    assert [parse_duration(v) for v in (600, "45", "30s", "10m", "1.5h", "250ms")] == [600, 45, 30, 600, 5400, 0.25]
    w = Window()
    w.add({"requests": 200, "errors": 2, "latency": [i / 100 for i in range(1, 201)]}, __import__("random").Random(0))
    assert (w.error_rate, w.p99("latency"), w.p99("ttft")) == (0.01, 1.98, None)
    (tmp_path / "probe.txt").write_text("First held-out text.\nStill the first.\n\n\nSecond text.\n")
    section = {"to": "v2", "gates": {"quality": {"file": "probe.txt", "max_loss_increase": 0.2}}}
    read = read_probe_file(section, tmp_path)
    assert read["gates"]["quality"] == {"prompts": ["First held-out text.\nStill the first.", "Second text."],
                                        "max_loss_increase": 0.2}
    with pytest.raises(RolloutError, match="cannot read the probe prompts .*missing.txt"):
        read_probe_file({"to": "v2", "gates": {"quality": {"file": "missing.txt"}}}, tmp_path)
