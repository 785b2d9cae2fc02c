"""`kiln bench serve`: a load generator for an OpenAI-compatible server.

N concurrent clients share M streaming /v1/completions requests. Prompts are random token
ids and prompt/output lengths come from a seeded uniform distribution around
`--input-len` / `--output-len` (± range_ratio), so two runs with the same seed send the same
requests. Every request asks for exactly its output length (`ignore_eos`, temperature 0).

Reported: request and output-token throughput, and percentiles of TTFT (request sent to
first token), TPOT (time per output token after the first: (latency - TTFT) / (tokens - 1))
and ITL (gaps between streamed chunks), and the prompt tokens the server says it took from
its prefix cache (`usage.prompt_tokens_details.cached_tokens`, from the last streamed chunk).

With `--profile` the report adds the server's step profile over the run (its `kiln_step_*`
metrics, scraped from /metrics before and after): the mean host time per step of each
phase, the step's wall and device time, the batch shape, and how busy the device was.

Prefix caching (`--shared-prefix-len P`, as vLLM's `--random-prefix-len`): every prompt
starts with a shared run of P random tokens, then its own random suffix of about
`--input-len` tokens. With `--num-prefixes G` there are G such prefixes, each shared by a
contiguous run of the requests, so at `--concurrency 1` the first request of each run is
cold and the rest can reuse its prefix. The report then splits the requests into cold (no
cached tokens in `usage`) and warm (some), with TTFT percentiles and cached-token counts for
each. A server keeps its cache between runs: repeat a run with another `--seed` (or against
a fresh server), or the "cold" requests are warm.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

from .extras import require


@dataclass
class BenchConfig:
    url: str = "http://127.0.0.1:8000"
    model: str | None = None          # default: the first model /v1/models lists
    concurrency: int = 4
    num_requests: int = 32
    seed: int = 0
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.5          # lengths uniform in [len * (1 - r), len * (1 + r)]
    token_range: tuple[int, int] = (1000, 10000)   # prompt token ids drawn from here
    api_key: str | None = None
    # Untimed requests first (`concurrency` of them at once, staggered lengths, so the batch
    # shrinks through every size): a GPU server captures its decode buckets at start-up but
    # the buckets of steps with prefill chunks on first use, which belongs to start-up, not
    # to the measurement.
    warmup: bool = False
    timeout: float = 600.0
    shared_prefix_len: int = 0        # tokens every prompt starts with (0: independent prompts)
    num_prefixes: int = 1             # distinct shared prefixes, each for a contiguous run of requests
    profile: bool = False             # add the server's step profile (kiln_step_* from /metrics)


@dataclass
class RequestResult:
    prompt_tokens: int
    output_tokens: int = 0
    ttft: float | None = None
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, if reported
    first_of_prefix: bool = False     # the first request sent with its shared prefix


def prefix_group(cfg: BenchConfig, i: int) -> int:
    """Which shared prefix request i starts with: contiguous runs of about equal size."""
    return i * min(cfg.num_prefixes, cfg.num_requests) // cfg.num_requests


def make_requests(cfg: BenchConfig) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request, the same for the same config. Without
    a shared prefix the random draws are those of earlier versions (same seed, same requests)."""
    if cfg.shared_prefix_len < 0 or cfg.num_prefixes < 1:
        raise ValueError("shared_prefix_len must be >= 0 and num_prefixes >= 1")
    rng = random.Random(cfg.seed)

    def length(mean: int) -> int:
        lo, hi = max(1, int(mean * (1 - cfg.range_ratio))), max(1, int(mean * (1 + cfg.range_ratio)))
        return rng.randint(lo, hi)
    prefixes = ([[rng.randrange(*cfg.token_range) for _ in range(cfg.shared_prefix_len)]
                 for _ in range(cfg.num_prefixes)] if cfg.shared_prefix_len else [[]])
    out = []
    for i in range(cfg.num_requests):
        n_in, n_out = length(cfg.input_len), length(cfg.output_len)
        prefix = prefixes[prefix_group(cfg, i)] if cfg.shared_prefix_len else []
        out.append((prefix + [rng.randrange(*cfg.token_range) for _ in range(n_in)], n_out))
    return out


async def _one(client, cfg: BenchConfig, model: str, prompt: list[int], max_tokens: int) -> RequestResult:
    res = RequestResult(len(prompt))
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    res.error = data["error"].get("message", "error")
                    break
                now = time.perf_counter()
                if data.get("usage"):
                    res.output_tokens = data["usage"]["completion_tokens"]
                    details = data["usage"].get("prompt_tokens_details") or {}
                    if details.get("cached_tokens") is not None:
                        res.cached_tokens = details["cached_tokens"]
                if data.get("choices") and data["choices"][0].get("text"):
                    if res.ttft is None:
                        res.ttft = now - t0
                    elif last is not None:
                        res.itl.append(now - last)
                    last = now
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        res.error = f"{type(e).__name__}: {e}"
    res.latency = time.perf_counter() - t0
    return res


def percentiles(xs: list[float], ps=(50, 90, 99)) -> dict:
    if not xs:
        return {f"p{p}": None for p in ps} | {"mean": None}
    s = sorted(xs)
    out = {f"p{p}": s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))] for p in ps}
    out["mean"] = statistics.fmean(s)
    return out


async def run_async(cfg: BenchConfig) -> dict:
    require("bench", "kiln bench serve")
    import httpx
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}

    def client() -> "httpx.AsyncClient":
        # One client, with one connection, per simulated user: httpx's pool looks at every
        # connection it holds for each request, so one shared pool costs the load generator
        # time quadratic in the concurrency (half its CPU at 64 streams).
        return httpx.AsyncClient(base_url=cfg.url, headers=headers, timeout=cfg.timeout,
                                 limits=httpx.Limits(max_connections=1))
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(client()) for _ in range(cfg.concurrency)]
        model = cfg.model
        if model is None:
            r = await clients[0].get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        requests = make_requests(cfg)
        if cfg.warmup:
            rng = random.Random(cfg.seed + 1)
            await asyncio.gather(*(
                _one(c, cfg, model, [rng.randrange(*cfg.token_range) for _ in range(16)], 2 + i)
                for i, c in enumerate(clients)))
        queue: asyncio.Queue = asyncio.Queue()
        for i, item in enumerate(requests):
            queue.put_nowait((i, *item))
        results: list[RequestResult] = []

        async def worker(c):
            while True:
                try:
                    i, prompt, n = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                res = await _one(c, cfg, model, prompt, n)
                res.first_of_prefix = i == 0 or prefix_group(cfg, i) != prefix_group(cfg, i - 1)
                results.append(res)

        before = await _step_metrics(clients[0]) if cfg.profile else None
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in clients))
        wall = time.perf_counter() - t0
        after = await _step_metrics(clients[0]) if cfg.profile else None
    ok = [r for r in results if r.error is None]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok
            if r.ttft is not None and r.output_tokens > 1]
    rep = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "api_key"} | {"model": model},
        "requests": len(results), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": wall,
        "request_throughput": len(ok) / wall,
        "output_tokens": out_tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "output_throughput": out_tokens / wall,
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": percentiles(tpot),
        "itl_s": percentiles([x for r in ok for x in r.itl]),
        "cached_tokens": sum(r.cached_tokens or 0 for r in ok),
    }
    if cfg.shared_prefix_len:
        rep["prefix_cache"] = prefix_cache_report(ok)
    if cfg.profile:
        rep["step_profile"] = step_profile(before, after, wall)
    return rep


async def _step_metrics(client) -> dict:
    """The sums and counts of the server's kiln_step_* histograms: {(metric, phase): value}."""
    from prometheus_client.parser import text_string_to_metric_families
    r = await client.get("/metrics")
    r.raise_for_status()
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name.startswith("kiln_step_") and s.name.endswith(("_sum", "_count")):
                out[(s.name, s.labels.get("phase"))] = s.value
    return out


def step_profile(before: dict, after: dict, wall: float) -> dict:
    """Means per engine step over the run, from two scrapes of the step metrics."""
    def delta(name, phase=None):
        return after.get((name, phase), 0.0) - before.get((name, phase), 0.0)
    steps = delta("kiln_step_seconds_count")
    if not steps:
        return {"steps": 0, "error": "the server reported no engine steps (kiln_step_* metrics)"}
    from kiln.runtime.metrics import STEP_PHASES
    step_s = delta("kiln_step_seconds_sum") / steps
    device_steps = delta("kiln_step_device_seconds_count")
    device_s = delta("kiln_step_device_seconds_sum") / device_steps if device_steps else None
    deliver_s = delta("kiln_step_phase_seconds_sum", "deliver") / steps
    return {
        "steps": int(steps), "steps_per_s": steps / wall,
        "sequences_per_step": delta("kiln_step_sequences_sum") / steps,
        "tokens_per_step": delta("kiln_step_tokens_sum") / steps,
        "phase_s": {p: delta("kiln_step_phase_seconds_sum", p) / steps for p in STEP_PHASES},
        "step_s": step_s,                   # schedule to output (deliver is after)
        "device_s": device_s,               # forward and sampling on the device (GPU only)
        # The share of the step the device was not working: the engine's host-bound part
        # (0 when async scheduling hides the host work behind the device's).
        "host_fraction": None if device_s is None else max(0.0, 1 - device_s / (step_s + deliver_s)),
        "device_busy": None if device_s is None else device_s * steps / wall,
    }


def prefix_cache_report(ok: list[RequestResult]) -> dict:
    """Cold vs. warm requests: by the cached tokens the server reported, or, where it reports
    none, by whether the request was the first sent with its prefix."""
    def warm(r: RequestResult) -> bool:
        return r.cached_tokens > 0 if r.cached_tokens is not None else not r.first_of_prefix

    def part(rs: list[RequestResult]) -> dict:
        cached = [r.cached_tokens for r in rs if r.cached_tokens is not None]
        return {"requests": len(rs),
                "prompt_tokens_mean": statistics.fmean(r.prompt_tokens for r in rs) if rs else None,
                "cached_tokens": {"min": min(cached, default=None), "max": max(cached, default=None),
                                  "mean": statistics.fmean(cached) if cached else None},
                "ttft_s": percentiles([r.ttft for r in rs if r.ttft is not None])}
    cold, hot = part([r for r in ok if not warm(r)]), part([r for r in ok if warm(r)])
    c50, w50 = cold["ttft_s"]["p50"], hot["ttft_s"]["p50"]
    return {"cold": cold, "warm": hot, "ttft_p50_speedup": c50 / w50 if c50 and w50 else None}


def run(cfg: BenchConfig) -> dict:
    return asyncio.run(run_async(cfg))


def code_version() -> str:
    """KILN_CODE_VERSION, else `git describe --always --dirty` of the checkout kiln runs from
    (as bench/provenance.py), else "unknown" (an installed wheel)."""
    import os
    import subprocess
    from importlib.resources import files
    if os.environ.get("KILN_CODE_VERSION"):
        return os.environ["KILN_CODE_VERSION"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True, cwd=str(files("kiln"))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def format_report(rep: dict) -> str:
    c = rep["config"]
    ms = lambda v: "-" if v is None else f"{v * 1e3:.1f}"  # noqa: E731
    lines = [
        f"kiln bench serve: {c['url']} model={c['model']} concurrency={c['concurrency']} "
        f"requests={rep['requests']} (failed {rep['failed']}) seed={c['seed']}",
        f"  input ~{c['input_len']} / output ~{c['output_len']} tokens (±{c['range_ratio']:.0%})"
        + (f" after a shared prefix of {c['shared_prefix_len']} tokens ({c['num_prefixes']} prefixes)"
           if c.get("shared_prefix_len") else ""),
        f"  duration            {rep['duration_s']:.2f} s",
        f"  requests/s          {rep['request_throughput']:.2f}",
        f"  output tokens/s     {rep['output_throughput']:.1f}  ({rep['output_tokens']} tokens)",
    ]
    for name in ("ttft_s", "tpot_s", "itl_s"):
        p = rep[name]
        lines.append(f"  {name[:-2].upper():5s} ms  mean {ms(p['mean'])}  p50 {ms(p['p50'])}  "
                     f"p90 {ms(p['p90'])}  p99 {ms(p['p99'])}")
    lines.append(f"  cached prompt tokens {rep['cached_tokens']} of {rep['prompt_tokens']}")
    pc = rep.get("prefix_cache")
    for name in ("cold", "warm") if pc else ():
        part, p = pc[name], pc[name]["ttft_s"]
        ct = part["cached_tokens"]
        cached = "-" if ct["mean"] is None else (f"{ct['mean']:.0f}" if ct["min"] == ct["max"]
                                                 else f"{ct['min']}-{ct['max']} (mean {ct['mean']:.0f})")
        lines.append(f"  {name} ({part['requests']} requests, cached tokens {cached}): TTFT ms  "
                     f"mean {ms(p['mean'])}  p50 {ms(p['p50'])}  p90 {ms(p['p90'])}  p99 {ms(p['p99'])}")
    if pc and pc["ttft_p50_speedup"]:
        lines.append(f"  TTFT p50 cold / warm  {pc['ttft_p50_speedup']:.1f}x")
    sp = rep.get("step_profile")
    if sp and sp["steps"]:
        us = lambda v: "-" if v is None else f"{v * 1e6:.0f}"  # noqa: E731
        lines.append(f"  engine steps {sp['steps']} ({sp['steps_per_s']:.0f}/s), "
                     f"{sp['sequences_per_step']:.1f} sequences and {sp['tokens_per_step']:.1f} "
                     f"tokens a step")
        lines.append("  step us  " + "  ".join(f"{k} {us(v)}" for k, v in sp["phase_s"].items())
                     + f"  | step {us(sp['step_s'])}  device {us(sp['device_s'])}")
        if sp["host_fraction"] is not None:
            lines.append(f"  host share of a step {sp['host_fraction']:.0%}, device busy "
                         f"{sp['device_busy']:.0%} of the run")
    elif sp:
        lines.append(f"  step profile: {sp['error']}")
    for e in rep["errors"]:
        lines.append(f"  error: {e}")
    return "\n".join(lines)
