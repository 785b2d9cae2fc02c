"""The engine's metrics as Prometheus exposition text: the inter-token latency histogram,
observed once per token without a lock (metrics.TokenHistogram), exports exactly what a
prometheus_client Histogram with the same observations exports."""
from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from kiln.runtime.metrics import LATENCY_BUCKETS, TokenHistogram


def exposition(registry) -> list[str]:
    # `_created` is the construction time: equal in kind, not in value
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_token_histogram_exports_what_a_histogram_exports():
    rng = random.Random(0)
    # on bucket bounds (le is inclusive), between them, past the last one, and zero
    values = [0.0, 0.001, 0.0025, 60.0, 61.0, 1e-6] + [rng.expovariate(50) for _ in range(500)]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = TokenHistogram("kiln_x_seconds", "Time between output tokens", LATENCY_BUCKETS, ours)
    ref = Histogram("kiln_x_seconds", "Time between output tokens", buckets=LATENCY_BUCKETS, registry=theirs)
    for v in values:
        mine.observe(v)
        ref.observe(v)
    assert exposition(ours) == exposition(theirs)
    assert any(line.startswith("kiln_x_seconds_bucket{le=\"+Inf\"} 506.0") for line in exposition(ours))
    created = [[line.split()[:-1] for line in generate_latest(r).decode().splitlines() if "_created" in line]
               for r in (ours, theirs)]
    assert created[0] == created[1] and created[0]   # the same lines, bar the time itself
