"""Which model version serves a request, when several are deployed at once (canary and blue-green rollouts).

A `TrafficSplit` maps version names to integer percentages that sum to 100. A request either
- pins a version: `model: NAME@VERSION` (an unknown version is an error naming the ones there are);
- carries a session id (the `X-Session-Id` header): its first request lands where the id hashes to on the split, so
  every router replica sends a new session to the same version, and `StickySessions` keeps it there while the
  weights move (a conversation does not switch models midway) until its version leaves the split (weight 0). Ids are
  at most `MAX_SESSION_ID_CHARS` long (the HTTP layer refuses longer ones) and the table keeps only their hashes;
- or neither: a version drawn at random by weight.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

PERCENT = 100
MAX_SESSION_ID_CHARS = 256


class UnknownVersionError(ValueError):
    """A request or a split named a version that is not deployed."""


@dataclass(frozen=True)
class TrafficSplit:
    """Version -> percent of traffic (integers summing to 100), in the order given."""

    weights: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, weights: Mapping[str, int], known: Iterable[str]) -> TrafficSplit:
        """Validate `weights` against the versions deployed (`known`); the error names what is wrong."""
        known = list(known)
        if not weights:
            raise ValueError("a traffic split needs at least one version")
        unknown = sorted(set(weights) - set(known))
        if unknown:
            raise UnknownVersionError(f"unknown version(s) {unknown} in the traffic split; deployed: {sorted(known)}")
        bad = {v: w for v, w in weights.items() if isinstance(w, bool) or not isinstance(w, int) or w < 0}
        if bad:
            raise ValueError(f"traffic weights must be whole percentages >= 0, got {bad}")
        if sum(weights.values()) != PERCENT:
            raise ValueError(f"traffic weights must sum to {PERCENT}, got {sum(weights.values())} ({dict(weights)})")
        return cls(tuple(weights.items()))

    def as_dict(self) -> dict[str, int]:
        return dict(self.weights)

    def serves(self, version: str) -> bool:
        return self.as_dict().get(version, 0) > 0

    def at(self, point: float) -> str:
        """The version at `point` in [0, 1) of the split laid out in order."""
        edge = 0.0
        for version, weight in self.weights:
            edge += weight / PERCENT
            if weight and point < edge:
                return version
        return next(v for v, w in reversed(self.weights) if w)  # point rounding up to 1.0

    def choose(self, session_id: str | None = None, rng: random.Random | None = None) -> str:
        return self.at(session_point(session_id) if session_id else (rng or random).random())


def session_point(session_id: str) -> float:
    """Where a session id falls in [0, 1): the same on every router replica and every restart."""
    digest = hashlib.blake2b(session_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


def split_model(model: str, base_name: str) -> str | None:
    """The version a request's `model` pins (`NAME@VERSION`), or None for the bare name."""
    name, at, version = model.partition("@")
    return version if at and name == base_name else None


class StickySessions:
    """Session id -> the version its first request went to, for `ttl_s` after its last request (at most `capacity`
    sessions, least recently used first out). Keyed by a 16-byte hash of the id, so the table holds no client text
    and a key costs the same whatever the id's length. Thread-safe."""

    def __init__(self, capacity: int = 100_000, ttl_s: float = 3600.0, clock=time.monotonic):
        self.capacity, self.ttl_s, self.clock = capacity, ttl_s, clock
        self._seen: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def route(self, split: TrafficSplit, session_id: str | None, rng: random.Random | None = None) -> str:
        if not session_id:
            return split.choose(rng=rng)
        key = hashlib.blake2b(session_id.encode(), digest_size=16, person=b"moe-session").digest()
        now = self.clock()
        with self._lock:
            held = self._seen.pop(key, None)
            if held is not None and now - held[1] <= self.ttl_s and split.serves(held[0]):
                version = held[0]
            else:
                version = split.choose(session_id)
            self._seen[key] = (version, now)
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
        return version

    def __len__(self) -> int:
        return len(self._seen)


__all__ = ["MAX_SESSION_ID_CHARS", "PERCENT", "StickySessions", "TrafficSplit", "UnknownVersionError", "session_point",
           "split_model"]
