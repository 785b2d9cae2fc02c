"""Prometheus metrics of one engine, in its own registry (several engines per process are fine).

The gauges read the engine's state when scraped, so they are never stale.

The step profile (`kiln_step_*`) says where an engine step's time goes, so a serving
throughput number can be explained: the host time of each phase (`STEP_PHASES`), the wall
time of the step, the device time of its forward pass and sampling (CUDA events, on a GPU
only), and the batch shape. `kiln bench serve --profile` reads them back as a table.
"""
from __future__ import annotations

import bisect
import itertools
import math
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STEP_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
                0.25, 1.0)
SIZE_BUCKETS = tuple(2 ** i for i in range(14))
# What each phase of a step covers, in the order a step runs them.
STEP_PHASES = {
    "schedule": "pick the sequences and build the flat batch",
    "forward": "copy the batch to the device and launch or replay the model (on a CPU: run it); "
               "with async scheduling, launch the sampling too",
    "sample": "sample, and copy the chosen tokens to the host (waits for the device; with async "
              "scheduling, for the previous step's tokens while this one runs)",
    "output": "append the tokens, check stops, detokenize",
    "deliver": "hand the outputs to the HTTP streams (serving only)",
}


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
        self.itl = TokenHistogram("kiln_inter_token_latency_seconds", "Time between output tokens",
                                  LATENCY_BUCKETS, r)
        self.e2e = Histogram("kiln_request_latency_seconds", "Arrival to finish",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.kv_used = Gauge("kiln_kv_blocks_used", "KV-cache blocks in use", registry=r)
        self.kv_usage = Gauge("kiln_kv_cache_usage", "Fraction of KV-cache blocks in use", registry=r)
        self.running = Gauge("kiln_requests_running", "Sequences holding KV blocks", registry=r)
        self.waiting = Gauge("kiln_requests_waiting", "Sequences queued or preempted", registry=r)
        phases = "; ".join(f"{k}: {v}" for k, v in STEP_PHASES.items())
        self.step_phase = Histogram("kiln_step_phase_seconds", f"Host time of each phase of an engine "
                                    f"step ({phases})", ["phase"], buckets=STEP_BUCKETS, registry=r)
        self.phase = {p: self.step_phase.labels(p) for p in STEP_PHASES}
        self.step_time = Histogram("kiln_step_seconds", "Wall time of an engine step, schedule to "
                                   "output", buckets=STEP_BUCKETS, registry=r)
        self.step_device = Histogram("kiln_step_device_seconds", "Device time of a step's forward "
                                     "pass and sampling (CUDA events; GPU runners only)",
                                     buckets=STEP_BUCKETS, registry=r)
        self.step_seqs = Histogram("kiln_step_sequences", "Sequences in a step", buckets=SIZE_BUCKETS,
                                   registry=r)
        self.step_tokens = Histogram("kiln_step_tokens", "New tokens in a step (prefill chunks and "
                                     "decodes)", buckets=SIZE_BUCKETS, registry=r)
        # Speculative decoding (runtime.spec_decode); zero while it is off.
        self.spec_draft_tokens = Counter("kiln_spec_draft_tokens", "Draft tokens verified "
                                         "(speculative decoding)", registry=r)
        self.spec_accepted_tokens = Counter("kiln_spec_accepted_tokens", "Draft tokens accepted "
                                            "(speculative decoding)", registry=r)
        self.spec_verify_steps = Gauge("kiln_spec_verify_steps", "Sequence-steps that verified "
                                       "drafts (speculative decoding)", registry=r)
        self.spec_mean_accepted_length = Gauge(
            "kiln_spec_mean_accepted_length", "Tokens a sequence gained per verify step: accepted "
            "drafts plus the one sampled after them (speculative decoding; 0 before any)", registry=r)
        self.spec_auto_off = Gauge("kiln_spec_auto_off", "Times a sequence stopped drafting for "
                                   "low acceptance (speculative decoding)", registry=r)

    def bind(self, kv_used: Callable[[], float], kv_usage: Callable[[], float],
             running: Callable[[], float], waiting: Callable[[], float]) -> None:
        self.kv_used.set_function(kv_used)
        self.kv_usage.set_function(kv_usage)
        self.running.set_function(running)
        self.waiting.set_function(waiting)

    def bind_spec(self, stats) -> None:
        """Read a spec_decode.SpecStats when scraped."""
        self.spec_verify_steps.set_function(lambda: stats.verify_steps)
        self.spec_mean_accepted_length.set_function(lambda: stats.mean_accepted_length)
        self.spec_auto_off.set_function(lambda: stats.auto_off)

    def observe_step(self, times: list[float], num_seqs: int, num_tokens: int,
                     device_seconds: float | None) -> None:
        """times: the clock at the start of the step and at the end of each phase but deliver."""
        for name, t0, t1 in zip(STEP_PHASES, times, times[1:]):
            self.phase[name].observe(t1 - t0)
        self.step_time.observe(times[-1] - times[0])
        if device_seconds is not None:
            self.step_device.observe(device_seconds)
        self.step_seqs.observe(num_seqs)
        self.step_tokens.observe(num_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class TokenHistogram:
    """A histogram observed once per generated token, exported with the samples of a
    prometheus_client Histogram (buckets, count, sum, created). Only the engine loop observes
    it, so an observation takes no lock: a bisect and two additions, a fifth of
    `Histogram.observe` (whose locks cost ~0.5 us a token, 0.13 ms of a 256-sequence step).
    A scrape from another thread may see a count and a sum one observation apart."""

    def __init__(self, name: str, documentation: str, buckets, registry: CollectorRegistry):
        self.name, self.documentation = name, documentation
        self.bounds = [float(b) for b in buckets] + [math.inf]
        self.counts = [0] * len(self.bounds)   # per bucket, not cumulative
        self.sum = 0.0
        self.created = time.time()
        registry.register(self)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1   # (le: the first bound >= value)
        self.sum += value

    def collect(self):
        counts, total = list(self.counts), self.sum
        family = HistogramMetricFamily(self.name, self.documentation, [
            (floatToGoString(b), float(c)) for b, c in zip(self.bounds, itertools.accumulate(counts))], total)
        family.add_sample(self.name + "_created", {}, self.created)
        yield family


class DeviceTimer:
    """CUDA events around the device work of a step; `seconds()` once the host has waited
    for it (None on other devices). Two events, reused step after step."""

    def __init__(self, device):
        import torch
        self.on = torch.device(device).type == "cuda" if device is not None else False
        if self.on:
            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))

    def start(self) -> None:
        if self.on:
            self.events[0].record()

    def stop(self) -> None:
        if self.on:
            self.events[1].record()

    def seconds(self) -> float | None:
        if not self.on:
            return None
        self.events[1].synchronize()
        return self.events[0].elapsed_time(self.events[1]) / 1e3
