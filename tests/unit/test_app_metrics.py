"""App-wide metrics under vLLM's names (moe_platform.serving.app_metrics): sums over live replicas, counters that
survive replaced engines and departed replicas, histograms, and text that Prometheus' own parser reads."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from moe_platform.serving.app_metrics import AppMetrics


def engine(running, waiting=0, blocks=8, prompt=0, generated=0, queries=0, hits=0, preempted=0) -> dict:
    return {"running": running, "waiting": waiting, "kv_cache_used": running, "kv_cache_capacity": blocks,
            "prompt_tokens": prompt, "generated_tokens": generated, "prefix_cache_queries": queries,
            "prefix_cache_hits": hits, "num_preemptions": preempted}


def parsed(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert s.labels["model_name"] == 'm"1'
            out[(s.name, s.labels.get("le"))] = s.value
    return out


def test_sums_over_live_replicas_and_keeps_counts_of_replaced_engines_and_gone_replicas():
    m = AppMetrics('m"1', replica_ttl_s=10)
    m.report("r1", 0, {"stable": engine(3, 1, prompt=10, generated=100, queries=64, hits=48, preempted=2),
                       "canary": engine(1, prompt=2, generated=7, queries=16)},
             {"stable": {"requests": 4, "errors": 1, "latency": [0.4, 2.0, 9.0], "ttft": [0.003, 0.05]}})
    m.report("r2", 1, {"stable": engine(2, 2, blocks=4, generated=50)}, {})
    got = parsed(m.render(2))
    assert got[("vllm:num_requests_running", None)] == 6 and got[("vllm:num_requests_waiting", None)] == 3
    assert got[("vllm:kv_cache_usage_perc", None)] == got[("vllm:gpu_cache_usage_perc", None)] == 6 / 20
    assert got[("vllm:generation_tokens_total", None)] == 157 and got[("vllm:prompt_tokens_total", None)] == 12
    assert got[("vllm:request_success_total", None)] == 3
    assert got[("vllm:prefix_cache_queries_total", None)] == 80 and got[("vllm:prefix_cache_hits_total", None)] == 48
    assert got[("vllm:gpu_prefix_cache_hit_rate", None)] == 48 / 80 and got[("vllm:num_preemptions_total", None)] == 2
    assert got[("vllm:e2e_request_latency_seconds_bucket", "0.5")] == 1
    assert got[("vllm:e2e_request_latency_seconds_bucket", "2.0")] == 2
    assert got[("vllm:e2e_request_latency_seconds_bucket", "+Inf")] == 3
    assert got[("vllm:e2e_request_latency_seconds_sum", None)] == 11.4
    assert got[("vllm:time_to_first_token_seconds_count", None)] == 2
    m.report("r1", 5, {"stable": engine(0, generated=20)}, {})  # r1's engines were swapped: their counts stay
    assert parsed(m.render(5))[("vllm:generation_tokens_total", None)] == 107 + 50 + 20
    got = parsed(m.render(11.5))  # r2 missed its reports: not running anything any more, its tokens still counted
    assert got[("vllm:num_requests_running", None)] == 0 and got[("vllm:generation_tokens_total", None)] == 177
    m.report("r1", 200, {"stable": engine(0, generated=20)}, {})  # r2 is forgotten, its count kept
    assert parsed(m.render(200))[("vllm:generation_tokens_total", None)] == 177


def series(text: str) -> dict:
    """Every sample of a scrape: (name, its labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_fresh_app_shows_every_series_at_zero_before_any_request():
    """rate() and increase() miss the first count of a series that appears already holding it (as Ray's counters
    do): every series of the app's /metrics, the labelled request counters included, is there at 0 from the start,
    and requests only move values, never add series."""
    m = AppMetrics('m"1')
    fresh = series(m.render(0))
    assert fresh and all(value == 0 for value in fresh.values()), {k: v for k, v in fresh.items() if v}
    requests = {dict(labels)["status"]: labels for name, labels in fresh if name == "moe_serve_app_requests_total"}
    assert sorted(requests) == ["2xx", "5xx"]
    assert {name for name, _ in fresh} >= {"vllm:request_success_total", "vllm:generation_tokens_total",
                                           "vllm:time_to_first_token_seconds_count", "vllm:num_requests_running"}
    m.report("r1", 1, {"stable": engine(1, generated=9)},
             {"stable": {"requests": 5, "errors": 2, "latency": [0.4], "ttft": [0.01]}})
    after = series(m.render(1))
    assert after.keys() == fresh.keys()
    assert after[("moe_serve_app_requests_total", requests["2xx"])] == 3
    assert after[("moe_serve_app_requests_total", requests["5xx"])] == 2
