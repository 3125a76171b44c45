"""A replica's own metrics: each engine's statistics exported as Ray metrics (the Ray dashboard and Prometheus), and
the log of finished requests per version that the rollout controller's gates read."""

from __future__ import annotations

import random
import threading

from ray.util import metrics as ray_metrics

from moe_platform.serving.engine import Engine

LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
MAX_SAMPLES_PER_EXPORT = 2000  # bounds the metric-export cost per interval; the distribution stays unbiased


class RayMetrics:
    """Engine statistics -> ray.util.metrics, exported from a background thread every `interval` seconds, tagged
    with the model name and the version each engine serves."""

    def __init__(self, model_name: str):
        tags = ("model", "version")
        self.model_name = model_name
        self.ttft = ray_metrics.Histogram("moe_serve_time_to_first_token_s", "time to first token (s)",
                                          LATENCY_BOUNDARIES, tags)
        self.itl = ray_metrics.Histogram("moe_serve_inter_token_latency_s", "time between two tokens of a request (s)",
                                         LATENCY_BOUNDARIES, tags)
        self.latency = ray_metrics.Histogram("moe_serve_request_latency_s", "time from a request's arrival to its "
                                             "last token (s)", LATENCY_BOUNDARIES, tags)
        self.requests = ray_metrics.Counter("moe_serve_requests", "finished requests by HTTP status class",
                                            ("model", "version", "status"))
        self.queue = ray_metrics.Gauge("moe_serve_queue_depth", "requests waiting for a batch slot", tags)
        self.batch = ray_metrics.Gauge("moe_serve_running_batch_size", "sequences in the running batch", tags)
        self.kv_usage = ray_metrics.Gauge("moe_serve_kv_cache_usage_perc", "fraction of the KV cache's blocks (or "
                                          "slots) held by running requests (0..1)", tags)
        self.tps = ray_metrics.Gauge("moe_serve_tokens_per_s", "generated tokens per second (10 s window)", tags)
        self.prefix_hit_rate = ray_metrics.Gauge("moe_serve_prefix_cache_hit_rate", "prompt tokens found in the "
                                                 "prefix cache over prompt tokens looked up, since the engine "
                                                 "started (0..1)", tags)
        self.preemptions = ray_metrics.Counter("moe_serve_preemptions", "running requests preempted for KV blocks "
                                               "(recomputed later)", tags)
        self.tokens = ray_metrics.Counter("moe_serve_generated_tokens", "generated tokens", tags)
        self.expert = ray_metrics.Counter("moe_serve_expert_tokens", "tokens routed to each expert",
                                          ("model", "version", "layer", "expert"))
        self.imbalance = ray_metrics.Gauge("moe_serve_expert_load_imbalance",
                                           "max over mean expert load per layer, worst layer", tags)
        self._last: dict[int, tuple[int, list[list[int]], int]] = {}

    def export(self, engine: Engine, version: str = "") -> tuple[dict, list[float]]:
        """Export `engine`'s statistics; return them and the time-to-first-token samples it drained."""
        tags = {"model": self.model_name, "version": version}
        stats = engine.stats()
        self.queue.set(stats["waiting"], tags)
        self.batch.set(stats["running"], tags)
        self.kv_usage.set(stats["kv_cache_usage"], tags)
        self.tps.set(stats["tokens_per_s"], tags)
        queries = stats["prefix_cache_queries"]
        self.prefix_hit_rate.set(stats["prefix_cache_hits"] / queries if queries else 0.0, tags)
        ttft, itl = engine.drain_latency_samples()
        for samples, hist in ((ttft, self.ttft), (itl, self.itl)):
            for value in sampled(samples):
                hist.observe(value, tags)
        prev_tokens, prev_load, prev_preempted = self._last.get(id(engine), (0, None, 0))
        if stats["generated_tokens"] > prev_tokens:
            self.tokens.inc(stats["generated_tokens"] - prev_tokens, tags)
        if stats["num_preemptions"] > prev_preempted:
            self.preemptions.inc(stats["num_preemptions"] - prev_preempted, tags)
        load = stats["expert_load"]
        worst = 0.0
        for layer, row in enumerate(load):
            for expert, count in enumerate(row):
                delta = count - (prev_load[layer][expert] if prev_load else 0)
                if delta > 0:
                    self.expert.inc(delta, {**tags, "layer": str(layer), "expert": str(expert)})
            mean = sum(row) / len(row)
            worst = max(worst, max(row) / mean if mean else 0.0)
        self.imbalance.set(worst, tags)
        self._last[id(engine)] = (stats["generated_tokens"], load, stats["num_preemptions"])
        return stats, ttft

    def export_requests(self, version: str, counts: dict[str, int], latency: list[float]) -> None:
        tags = {"model": self.model_name, "version": version}
        for status, n in counts.items():
            self.requests.inc(n, {**tags, "status": status})
        for value in sampled(latency):
            self.latency.observe(value, tags)

    def forget(self, engines) -> None:
        """Drop the delta state of engines no longer served."""
        keep = {id(e) for e in engines}
        self._last = {k: v for k, v in self._last.items() if k in keep}


def sampled(samples: list[float]) -> list[float]:
    return random.sample(samples, MAX_SAMPLES_PER_EXPORT) if len(samples) > MAX_SAMPLES_PER_EXPORT else samples


class RequestLog:
    """Finished requests per version since the last `take` (thread-safe): status classes and latencies."""

    def __init__(self):
        self._lock = threading.Lock()
        self._data: dict[str, dict] = {}

    def observe(self, version: str | None, status: int, seconds: float) -> None:
        with self._lock:
            entry = self._data.setdefault(version or "", {"counts": {}, "latency": []})
            key = f"{status // 100}xx"
            entry["counts"][key] = entry["counts"].get(key, 0) + 1
            if status < 400 and len(entry["latency"]) < 4 * MAX_SAMPLES_PER_EXPORT:
                entry["latency"].append(seconds)

    def take(self) -> dict[str, dict]:
        with self._lock:
            data, self._data = self._data, {}
        return data
