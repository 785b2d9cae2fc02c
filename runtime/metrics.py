"""Prometheus metrics of one engine, in its own registry (several engines per process are fine).

The gauges read the engine's state when scraped, so they are never stale.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class EngineMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kiln_requests", "Finished requests by finish reason",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.cached_tokens = Counter("kiln_prefix_cache_hit_tokens",
                                     "Prompt tokens served from the prefix cache", registry=r)
        self.generation_tokens = Counter("kiln_generation_tokens", "Generated tokens", registry=r)
        self.preemptions = Counter("kiln_preemptions", "Sequences preempted for recompute", registry=r)
        self.ttft = Histogram("kiln_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("kiln_inter_token_latency_seconds", "Time between output tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("kiln_request_latency_seconds", "Arrival to finish",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.kv_used = Gauge("kiln_kv_blocks_used", "KV-cache blocks in use", registry=r)
        self.kv_usage = Gauge("kiln_kv_cache_usage", "Fraction of KV-cache blocks in use", registry=r)
        self.running = Gauge("kiln_requests_running", "Sequences holding KV blocks", registry=r)
        self.waiting = Gauge("kiln_requests_waiting", "Sequences queued or preempted", registry=r)

    def bind(self, kv_used: Callable[[], float], kv_usage: Callable[[], float],
             running: Callable[[], float], waiting: Callable[[], float]) -> None:
        self.kv_used.set_function(kv_used)
        self.kv_usage.set_function(kv_usage)
        self.running.set_function(running)
        self.waiting.set_function(waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)
