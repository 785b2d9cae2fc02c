"""Where a served step's time goes on the device: the engine of `kiln serve` in this process,
under torch.profiler, for a few batch shapes.

    python bench/step_profile.py ARTIFACT --seqs 1,64,256 --out $OUT/step_profile.json

For each N, N requests (128-token prompts, greedy, `ignore_eos`) are admitted and run
until every one decodes; the profiler then records `--steps` decode steps. A steady run
follows: N streams whose requests (128 in / 128 out +-50%) are replaced as they finish, so
steps mix prefill chunks with decodes as under `kiln bench serve`. Each run prints the
host time of each engine phase, how the runner ran its steps (graph replays, captures,
eager steps), and the top kernels and host calls by self time; the JSON keeps them all.
Decode buckets are captured before the runs, as `kiln serve` does; mixed buckets as the
serving config says.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kiln.serving import ServingConfig, build_served
from kiln.runtime.model_runner import pick_bucket
from kiln.runtime.sequence import SamplingParams
from provenance import code_version

PROMPT = 128


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def phases_us(engine, before: dict) -> dict:
    """Mean host microseconds per step of each phase since `before` (sum and count)."""
    now = phase_totals(engine)
    steps = now["steps"] - before["steps"]
    return {k: round(1e6 * (now[k] - before[k]) / max(steps, 1), 1) for k in now if k != "steps"} | {
        "steps": steps}


def phase_totals(engine) -> dict:
    out = {"steps": 0.0}
    for metric in engine.metrics.step_phase.collect():
        for s in metric.samples:
            if s.name.endswith("_sum"):
                out[s.labels["phase"]] = s.value
    for metric in engine.metrics.step_time.collect():
        for s in metric.samples:
            if s.name.endswith("_count"):
                out["steps"] = s.value
            elif s.name.endswith("_sum"):
                out["step"] = s.value
    for metric in engine.metrics.step_device.collect():
        for s in metric.samples:
            if s.name.endswith("_sum"):
                out["device"] = s.value
    return out


def runner_counts(runner) -> dict:
    return {"steps": runner.steps, "replays": runner.replays, "graphs": len(runner._graphs)}


def replay_floor(runner, n: int, times: int = 50) -> dict | None:
    """Device time of the decode bucket holding n, replayed back to back (no host gaps),
    and the host time of one replay call."""
    b = pick_bucket(n, runner.seq_buckets)
    key = (b, b)
    entry = runner._graphs.get(key)
    if entry is None:
        return None
    graph = entry[0]
    graph.replay()
    sync()
    t0 = time.perf_counter()
    for _ in range(times):
        graph.replay()
    host = time.perf_counter() - t0
    sync()
    return {"bucket": key, "device_us": round(1e6 * (time.perf_counter() - t0) / times, 1),
            "host_us_per_replay_call": round(1e6 * host / times, 1)}


def table(prof, key: str, n: int) -> list[dict]:
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]
    return [{"name": e.key[:90], "calls": e.count, "self_us": round(getattr(e, key), 1)} for e in rows]


def run(engine, steps: int, warm_steps: int, streams: int | None, rng) -> dict:
    """Profile `steps` engine steps after `warm_steps`. `streams`: keep that many requests
    in flight (mixed steps); None: decode only (the requests already admitted)."""
    params_of = lambda n: SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    def top_up():
        if streams is None:
            return
        while len(engine.seqs) < streams:
            n = rng.randint(PROMPT // 2, PROMPT * 3 // 2)
            engine.add_request([rng.randrange(1000, 10000) for _ in range(n)], params_of(n))

    for _ in range(warm_steps):
        top_up()
        engine.step()
    sync()
    phases, counts = phase_totals(engine), runner_counts(engine.runner)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            top_up()
            engine.step()
        sync()
    wall = time.perf_counter() - t0
    after = runner_counts(engine.runner)
    return {"wall_ms_per_step_profiled": round(1e3 * wall / steps, 3),
            "phases_us": phases_us(engine, phases),
            "runner": {k: after[k] - counts[k] for k in after},
            "kernels": table(prof, "self_device_time_total", 25),
            "host": table(prof, "self_cpu_time_total", 25)}


def timed(engine, steps: int, streams: int | None, rng) -> dict:
    """The same loop without the profiler: wall time per step and phase means."""
    phases = phase_totals(engine)
    counts = runner_counts(engine.runner)
    t0 = time.perf_counter()
    for _ in range(steps):
        if streams is not None:
            while len(engine.seqs) < streams:
                n = rng.randint(PROMPT // 2, PROMPT * 3 // 2)
                engine.add_request([rng.randrange(1000, 10000) for _ in range(n)],
                                   SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        engine.step()
    sync()
    after = runner_counts(engine.runner)
    return {"wall_ms_per_step": round(1e3 * (time.perf_counter() - t0) / steps, 3),
            "phases_us": phases_us(engine, phases),
            "runner": {k: after[k] - counts[k] for k in after}}


def show(title: str, r: dict) -> None:
    print(f"\n== {title}")
    print("  phases us/step:", r["phases_us"], " runner:", r["runner"])
    if "kernels" in r:
        print("  top kernels (self device us over the window):")
        for row in r["kernels"][:15]:
            print(f"    {row['self_us']:>10.1f}  x{row['calls']:<5} {row['name']}")
        print("  top host calls (self cpu us over the window):")
        for row in r["host"][:15]:
            print(f"    {row['self_us']:>10.1f}  x{row['calls']:<5} {row['name']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--seqs", default="1,64,256")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-cache-gib", type=float, default=16)
    ap.add_argument("--out")
    args = ap.parse_args()
    seqs = [int(s) for s in args.seqs.split(",")]
    cfg = ServingConfig(max_num_seqs=max(max(seqs), 1), max_num_batched_tokens=args.max_num_batched_tokens,
                        kv_cache_gib=args.kv_cache_gib, max_waiting=4096)
    t0 = time.perf_counter()
    served = build_served(args.artifact, cfg)
    print(f"loaded in {time.perf_counter() - t0:.1f} s: {served.seconds}")
    gc.collect()
    gc.freeze()   # as kiln serve's engine process does: no full collection over start-up's objects mid-step
    engine = served.engine
    rng = random.Random(0)
    report = {"code_version": code_version(), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "artifact": args.artifact,
              "startup_seconds": served.seconds, "runs": {}}
    for n in seqs:
        for _ in range(n):
            engine.add_request([rng.randrange(1000, 10000) for _ in range(PROMPT)],
                               SamplingParams(max_tokens=engine.max_model_len - PROMPT, temperature=0,
                                              ignore_eos=True))
        while any(s.num_output_tokens == 0 for s in engine.seqs.values()):
            engine.step()
        r = run(engine, args.steps, 3, None, rng) | {"timed": timed(engine, 50, None, rng),
                                                      "replay": replay_floor(engine.runner, n)}
        show(f"decode, {n} sequences", r)
        print("  unprofiled:", r["timed"], " graph replayed back to back:", r["replay"])
        report["runs"][f"decode_{n}"] = r
        for rid in list(engine.seqs):
            engine.abort(rid)
        r = run(engine, args.steps, 100, n, rng) | {"timed": timed(engine, 100, n, rng)}
        show(f"steady, {n} streams (128 in / 128 out +-50%)", r)
        print("  unprofiled:", r["timed"])
        report["runs"][f"steady_{n}"] = r
        for rid in list(engine.seqs):
            engine.abort(rid)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
