"""Traffic splits between model versions (moe_platform.serving.traffic): weights, pins, sticky sessions."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from moe_platform.serving.traffic import (
    StickySessions,
    TrafficSplit,
    UnknownVersionError,
    session_point,
    split_model,
)

DEPLOYED = ["v1", "v2", "v3"]


@pytest.mark.parametrize("weights", [{"v1": 95, "v2": 5}, {"v1": 50, "v2": 25, "v3": 25}, {"v2": 100}])
def test_observed_fractions_match_the_weights_within_3_points(weights):
    split = TrafficSplit.of(weights, DEPLOYED)
    rng = random.Random(0)
    random_draws = Counter(split.choose(rng=rng) for _ in range(2000))
    sessions = Counter(split.choose(f"session-{i}") for i in range(2000))
    for counts in (random_draws, sessions):
        assert set(counts) <= {v for v, w in weights.items() if w}
        for version, weight in weights.items():
            assert abs(100 * counts[version] / 2000 - weight) <= 3, (version, counts)


def test_a_session_lands_on_the_same_version_on_every_router():
    split = TrafficSplit.of({"v1": 50, "v2": 50}, DEPLOYED)
    a, b = StickySessions(), StickySessions()  # two router replicas, nothing shared
    ids = [f"user-{i}" for i in range(200)]
    assert [a.route(split, s) for s in ids] == [b.route(split, s) for s in ids]
    assert {a.route(split, s) for s in ids} == {"v1", "v2"}
    assert 0 <= session_point("x") < 1 and session_point("x") == session_point("x")


def test_sessions_stay_while_weights_move_and_leave_a_version_that_leaves():
    sessions = StickySessions()
    canary_5 = TrafficSplit.of({"v1": 95, "v2": 5}, DEPLOYED)
    first = {f"s{i}": sessions.route(canary_5, f"s{i}") for i in range(500)}
    assert Counter(first.values())["v2"] > 0
    canary_50 = TrafficSplit.of({"v1": 50, "v2": 50}, DEPLOYED)
    assert {s: sessions.route(canary_50, s) for s in first} == first  # no conversation switches midway
    assert Counter(canary_50.choose(s) for s in first)["v2"] > Counter(first.values())["v2"]  # new ones would
    rolled_back = TrafficSplit.of({"v1": 100, "v2": 0}, DEPLOYED)
    assert {sessions.route(rolled_back, s) for s in first} == {"v1"}  # the rolled-back version serves nobody


def test_idle_sessions_expire_and_the_table_is_bounded():
    now = [0.0]
    sessions = StickySessions(capacity=3, ttl_s=10, clock=lambda: now[0])
    stable, canary = TrafficSplit.of({"v1": 100}, DEPLOYED), TrafficSplit.of({"v2": 100}, DEPLOYED)
    assert sessions.route(stable, "a") == "v1"
    now[0] = 5
    assert sessions.route(TrafficSplit.of({"v1": 1, "v2": 99}, DEPLOYED), "a") == "v1"  # held
    now[0] = 16
    assert sessions.route(canary, "a") == "v2"  # idle 11 s > ttl: chosen again (v1 no longer serves anyway)
    now[0] = 17
    assert sessions.route(TrafficSplit.of({"v1": 50, "v2": 50}, DEPLOYED), "a") == "v2"
    for s in "bcd":
        sessions.route(stable, s)
    assert len(sessions) == 3  # "a", the least recently used, went first
    assert sessions.route(TrafficSplit.of({"v1": 50, "v2": 50}, DEPLOYED), "b") == "v1"


def test_no_session_draws_at_random():
    split = TrafficSplit.of({"v1": 50, "v2": 50}, DEPLOYED)
    assert {StickySessions().route(split, None, random.Random(i)) for i in range(50)} == {"v1", "v2"}


def test_a_request_pins_a_version_by_name_at_version():
    assert split_model("moe@v2", "moe") == "v2"
    assert split_model("moe", "moe") is None
    assert split_model("other@v2", "moe") is None


@pytest.mark.parametrize("weights, error, match", [
    ({}, ValueError, r"at least one version"),
    ({"v1": 90, "v9": 10}, UnknownVersionError, r"unknown version\(s\) \['v9'\].*deployed: \['v1', 'v2', 'v3'\]"),
    ({"v1": 90, "v2": 5}, ValueError, r"must sum to 100, got 95"),
    ({"v1": 110, "v2": -10}, ValueError, r"whole percentages >= 0, got \{'v2': -10\}"),
    ({"v1": 99.5, "v2": 0.5}, ValueError, r"whole percentages"),
])
def test_bad_splits_are_refused_with_what_is_wrong(weights, error, match):
    with pytest.raises(error, match=match):
        TrafficSplit.of(weights, DEPLOYED)


def test_the_session_table_holds_hashes_not_the_ids():
    split = TrafficSplit.of({"v1": 50, "v2": 50}, DEPLOYED)
    sessions = StickySessions()
    ids = ["user-42", "x" * 256, "conversation é"]
    first = [sessions.route(split, s) for s in ids]
    assert all(isinstance(k, bytes) and len(k) == 16 for k in sessions._seen)
    assert not any(s.encode() in k or s in repr(k) for s in ids for k in sessions._seen)
    assert [sessions.route(split, s) for s in ids] == first and len(sessions) == 3  # still sticky, one entry each
