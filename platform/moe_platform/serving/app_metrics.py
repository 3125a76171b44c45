"""App-wide serving metrics under vLLM's names, for `GET /metrics` (no Ray here).

Every replica reports its engines' state and its finished requests to the app's controller each metrics interval;
`AppMetrics` sums them over the live replicas and renders the Prometheus text format with the names vLLM's
OpenAI server uses (`vllm:num_requests_running`, `vllm:kv_cache_usage_perc`, `vllm:time_to_first_token_seconds`,
`vllm:prefix_cache_hits_total`, ...), so dashboards and autoscalers written for vLLM read this app as they read a
vLLM server, whichever replica answers the scrape. The same figures, per replica and per version, also go to Ray's
metrics as `ray_moe_serve_*`.

Every series here exists from the app's first scrape, at 0, labelled ones included (`moe_serve_app_requests_total` for
each status class): a counter that first appears holding its first count hides that count from `rate()` and
`increase()`, which is what happens to Ray's own counters (ray.util.metrics cannot add 0).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# vLLM's bucket bounds for these two histograms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)


@dataclass
class Histogram:
    bounds: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound

    def observe(self, values: Sequence[float]) -> None:
        for value in values:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.total += value
            self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip([*self.bounds, math.inf], self.counts, strict=True):
            cumulative += n
            le = "+Inf" if bound == math.inf else repr(float(bound))
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {cumulative}')
        return [*out, f"{name}_sum{{{labels}}} {self.total!r}", f"{name}_count{{{labels}}} {self.count}"]


@dataclass
class _Replica:
    seen: float
    gauges: dict[str, float]
    totals: dict[str, float]


class AppMetrics:
    """Sums of the replicas' reports. `report` per replica and interval; `render` for a scrape."""

    GAUGES = ("running", "waiting", "kv_cache_used", "kv_cache_capacity")
    COUNTERS = ("prompt_tokens", "generated_tokens", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions")
    ENGINE_KEYS = GAUGES + COUNTERS  # what a replica reports of each engine's stats
    STATUS_CLASSES = ("2xx", "5xx")  # of finished completion requests (replicas report served and failed ones)

    def __init__(self, model_name: str, replica_ttl_s: float = 10.0):
        self.model_name = model_name
        self.replica_ttl_s = replica_ttl_s
        self.replicas: dict[str, _Replica] = {}
        self.retired = dict.fromkeys(self.COUNTERS, 0.0)  # counts of engines and replicas that are gone
        self.ttft = Histogram(TTFT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.succeeded = 0
        self.failed = 0

    def report(self, replica: str, now: float, engines: Mapping[str, Mapping], stats: Mapping[str, Mapping]) -> None:
        """`engines`: version -> its engine's stats (`ENGINE_KEYS`: its gauges and cumulative counters);
        `stats`: version -> the requests finished since the last report (requests, errors, latency, ttft)."""
        gauges = {key: float(sum(e[key] for e in engines.values())) for key in self.GAUGES}
        totals = {key: float(sum(e[key] for e in engines.values())) for key in self.COUNTERS}
        before = self.replicas.get(replica)
        if before is not None:
            for key in self.COUNTERS:
                if totals[key] < before.totals[key]:  # an engine was replaced: keep what the old one counted
                    self.retired[key] += before.totals[key]
        self.replicas[replica] = _Replica(now, gauges, totals)
        for delta in stats.values():
            self.ttft.observe(delta.get("ttft", ()))
            self.e2e.observe(delta.get("latency", ()))
            self.failed += int(delta.get("errors", 0))
            self.succeeded += int(delta.get("requests", 0)) - int(delta.get("errors", 0))
        for name, r in list(self.replicas.items()):  # a replica gone for good: its counts stay in the totals
            if now - r.seen > 10 * self.replica_ttl_s:
                for key in self.COUNTERS:
                    self.retired[key] += r.totals[key]
                del self.replicas[name]

    def render(self, now: float) -> str:
        live = [r for r in self.replicas.values() if now - r.seen <= self.replica_ttl_s]
        gauge = {key: sum(r.gauges[key] for r in live) for key in self.GAUGES}
        total = {key: self.retired[key] + sum(r.totals[key] for r in self.replicas.values()) for key in self.COUNTERS}
        usage = gauge["kv_cache_used"] / gauge["kv_cache_capacity"] if gauge["kv_cache_capacity"] else 0.0
        queries, hits = total["prefix_cache_queries"], total["prefix_cache_hits"]
        labels = f'model_name="{_escape(self.model_name)}"'
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, lines: list[str]) -> None:
            out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines])

        metric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
               [f"vllm:num_requests_running{{{labels}}} {gauge['running']:g}"])
        metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
               [f"vllm:num_requests_waiting{{{labels}}} {gauge['waiting']:g}"])
        for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            metric(name, "gauge", "KV-cache usage: the share of KV blocks held by requests. 1 means 100 percent "
                   "usage.", [f"{name}{{{labels}}} {usage!r}"])
        metric("vllm:prefix_cache_queries_total", "counter", "Prefix cache queries, in terms of number of queried "
               "tokens.", [f"vllm:prefix_cache_queries_total{{{labels}}} {queries:g}"])
        metric("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of number of cached tokens.",
               [f"vllm:prefix_cache_hits_total{{{labels}}} {hits:g}"])
        rate = hits / queries if queries else 0.0
        metric("vllm:gpu_prefix_cache_hit_rate", "gauge", "Prefix cache hit rate: cached tokens over queried "
               "tokens, since start.", [f"vllm:gpu_prefix_cache_hit_rate{{{labels}}} {rate!r}"])
        metric("vllm:num_preemptions_total", "counter", "Cumulative number of preemptions from the engine.",
               [f"vllm:num_preemptions_total{{{labels}}} {total['num_preemptions']:g}"])
        metric("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
               [f"vllm:prompt_tokens_total{{{labels}}} {total['prompt_tokens']:g}"])
        metric("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
               [f"vllm:generation_tokens_total{{{labels}}} {total['generated_tokens']:g}"])
        metric("vllm:request_success_total", "counter", "Count of successfully processed requests.",
               [f"vllm:request_success_total{{{labels}}} {self.succeeded}"])
        by_status = {"2xx": self.succeeded, "5xx": self.failed}
        metric("moe_serve_app_requests_total", "counter", "Finished completion requests by HTTP status class (2xx "
               "served, 5xx failed), over the app's replicas.",
               [f'moe_serve_app_requests_total{{{labels},status="{status}"}} {by_status[status]}'
                for status in self.STATUS_CLASSES])
        metric("vllm:time_to_first_token_seconds", "histogram", "Histogram of time to first token in seconds.",
               self.ttft.lines("vllm:time_to_first_token_seconds", labels))
        metric("vllm:e2e_request_latency_seconds", "histogram", "Histogram of end to end request latency in seconds.",
               self.e2e.lines("vllm:e2e_request_latency_seconds", labels))
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


__all__ = ["E2E_BUCKETS", "TTFT_BUCKETS", "AppMetrics", "Histogram"]
