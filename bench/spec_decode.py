"""Speculative decoding through the serving engine: decode tok/s and mean accepted length,
speculation off beside each drafter, on the same compiled model in the same run.

    python bench/spec_decode.py --model smollm2 --target cpu --quant int8_weight_only \
        --methods off,ngram:2,ngram:4,layerskip:2 --out bench/results/spec-cpu
    python bench/spec_decode.py --model smollm2 --target cuda --dtype bfloat16 \\
        --methods off,ngram:4,ngram:8 --streams 1,64 --out bench/results/spec-h200
    # a draft model: SmolLM2-135M's shape drafting for SmolLM2-1.7B's, random weights
    python bench/make_shape_model.py smollm2-1.7b-shape -o /tmp/smollm2-1.7b-shape
    python bench/make_shape_model.py smollm2-shape -o /tmp/smollm2-shape
    python bench/spec_decode.py --model /tmp/smollm2-1.7b-shape --target cuda --dtype bfloat16 \\
        --methods off,draft:/tmp/smollm2-shape:4 --no-auto-off --project 0.6,0.8 --out DIR

The model is compiled once (`kiln.serving.build_served`, as `kiln generate` does); each
method gets a fresh engine over the same runner (so the same compiled graph and KV cache).
Workloads: `rewrite` (copy a paragraph with its spelling fixed) and `code` (rename a
variable in a function) are repetition-heavy, the case prompt lookup is for; `chat` is an
open question. Greedy, batch 1 by default: a request's decode tok/s is its tokens after
the first over the time after the first (the prefill excluded), the median of `--repeats`
runs after one warm-up. `identical` says whether every request produced the tokens of
speculation off (it must, for greedy). With `--streams N` (N > 1) every workload's prompt
is sent N times at once (distinct seeds do not matter for greedy; prefix caching is off so
each is a full request) and the column is output tok/s of the batch: the check that
auto-off keeps speculation from costing throughput at high concurrency.

Random-weight shapes (bench/make_shape_model.py) give real step costs but drafts that
hardly ever stand. `--no-auto-off` drafts every step all the same, and `--project A,...`
then gives each speculative row the speedup it would have if each draft stood with
probability A: its measured speedup x (1 + A + ... + A^K) / its measured mean accepted
length, the cost of a step taken as it was measured (at batch 1 it hardly depends on how
many drafts stand).

Prints a table and writes `spec_decode.json` under `--out` with the device, the load
average at start and end (on a shared CPU the numbers move with it), the code version and
the command.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from provenance import code_version

WORKLOADS = {
    "rewrite": (
        "Rewrite the following paragraph, keeping every sentence but fixing the spelling:\n\n"
        "The kiln compiler takes a PyTorch model and captures it into its own IR. Then fusion "
        "passes written as declarative rewrite rules turn the graph into fused LLM operators "
        "such as attention, MoE and RMS norm. A target backend lowers the graph to Triton "
        "kernels or to CPU code, and a compact serving runtime runs the result behind an "
        "OpenAI-compatible server. The runtime batches requests continously, caches prefixes, "
        "and preempts sequences when the KV cache is full."),
    "code": (
        "Rename the variable `total` to `running_sum` in this Python function and return the "
        "whole function:\n\n```python\ndef mean_of_positive(values):\n    total = 0\n    count = 0\n"
        "    for value in values:\n        if value > 0:\n            total += value\n"
        "            count += 1\n    if count == 0:\n        return 0.0\n"
        "    return total / count\n```"),
    "chat": "Write a short story about a robot who learns to paint.",
}


def step_breakdown(engine) -> dict:
    """Mean wall and device milliseconds of the engine's steps and of each host phase (from its
    /metrics registry): where a verify step's time goes beside a plain one's."""
    reg = engine.metrics.registry

    def mean_ms(name, **labels):
        n = reg.get_sample_value(f"{name}_count", labels) or 0
        return round(1e3 * reg.get_sample_value(f"{name}_sum", labels) / n, 4) if n else None
    out = {"steps": int(reg.get_sample_value("kiln_step_seconds_count") or 0),
           "step_ms": mean_ms("kiln_step_seconds"),
           "device_ms": mean_ms("kiln_step_device_seconds")}
    for phase in ("schedule", "forward", "sample", "output"):
        out[f"{phase}_ms"] = mean_ms("kiln_step_phase_seconds", phase=phase)
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def device_name(runner) -> str:
    dev = torch.device(runner.device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} torch threads)"


def run_requests(engine, prompts: list[list[int]], params) -> tuple[list[list[int]], float, float]:
    """All prompts at once through the engine: (tokens per request, decode seconds of the
    slowest, wall seconds). Decode time is from a request's first token to its last."""
    t0 = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    tokens = {i: [] for i in ids}
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    while engine.has_unfinished():
        for out in engine.step():
            now = time.perf_counter()
            if out.token_ids:
                first.setdefault(out.request_id, now)
                last[out.request_id] = now
            tokens[out.request_id] += out.token_ids
    wall = time.perf_counter() - t0
    decode = max(last[i] - first[i] for i in ids)
    return [tokens[i] for i in ids], decode, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2, an HF directory, a GGUF file, "
                    "or an artifact directory")
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quant", default="auto", help="as kiln generate's --quant")
    ap.add_argument("--methods", default="off,ngram:2,ngram:4,ngram:8",
                    help="comma-separated: off and --speculative values")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--streams", default="1", help="comma-separated concurrent requests")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--batch-invariant", choices=("verify", "all", "off"), default="verify",
                    help="as kiln serve --batch-invariant (verify: speculation's verify rows "
                         "computed as one-row batches)")
    ap.add_argument("--no-auto-off", action="store_true",
                    help="draft every step whatever the acceptance (spec_decode's auto-off off)")
    ap.add_argument("--project", default="", metavar="A,...",
                    help="with --no-auto-off: per speculative row, the speedup projected at "
                         "each per-draft acceptance A from its measured step cost")
    ap.add_argument("--out", help="directory for spec_decode.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    projections = [float(a) for a in args.project.split(",") if a]
    if projections and not args.no_auto_off:
        raise SystemExit("bench/spec_decode.py: --project needs --no-auto-off (a projection "
                         "from a run whose steps did not all draft would mix in plain steps)")
    if args.no_auto_off:
        from kiln.runtime import spec_decode
        spec_decode.AUTO_OFF_MIN_ACCEPTED = 0.0

    from kiln.generate import chat_input_ids
    from kiln.runtime.engine import EngineConfig, LLMEngine
    from kiln.runtime.sequence import SamplingParams
    from kiln.runtime.spec_decode import SpeculativeConfig
    from kiln.artifact import Steps
    from kiln.serving import ServingConfig, build_served, draft_model_runner

    methods = [m.strip() for m in args.methods.split(",")]
    configs = {m: None if m == "off" else SpeculativeConfig.parse(m) for m in methods}
    streams = [int(s) for s in args.streams.split(",")]
    load_start = load_average()
    # layerskip's draft graph is compiled with the model (one set of skipped layers a run).
    skips = {c.layers for c in configs.values() if c is not None and c.method == "layerskip"}
    if len(skips) > 1:
        raise SystemExit("bench/spec_decode.py: one layerskip layer set a run (K may differ)")
    layerskip = next((c for c in configs.values() if c is not None and c.method == "layerskip"), None)
    cfg = ServingConfig(max_model_len=1024, max_num_seqs=max(256, max(streams)),
                        enable_prefix_caching=False, speculative=layerskip,
                        batch_invariant=args.batch_invariant)
    served = build_served(args.model, cfg, target=args.target, dtype=args.dtype, quant=args.quant)
    runner, tok = served.engine.runner, served.tokenizer
    draft_runners = {"layerskip": served.engine.spec.proposer.runner} if layerskip is not None else {}
    # draft:PATH:K: each draft model loaded or compiled once, as kiln serve does.
    for c in configs.values():
        if c is not None and c.method == "draft" and c.draft_model not in draft_runners:
            draft_runners[c.draft_model] = draft_model_runner(
                dataclasses.replace(cfg, speculative=c), runner, tok, args.model, args.target,
                args.dtype, 16, Steps(False), args.quant)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=False)

    rows = []
    for workload in args.workloads.split(","):
        prompt = chat_input_ids(tok, WORKLOADS[workload])[0].tolist()
        for n in streams:
            baseline = None
            for method in methods:
                engine = LLMEngine(runner, tok, EngineConfig(
                    max_num_seqs=cfg.max_num_seqs, enable_prefix_caching=False,
                    speculative=configs[method], invariant_verify=args.batch_invariant != "off"),
                    draft_runner=None if configs[method] is None else draft_runners.get(
                        configs[method].draft_model or configs[method].method))
                run_requests(engine, [prompt], SamplingParams(max_tokens=8, temperature=0))   # warm-up
                if engine.spec is not None:
                    engine.spec.stats.__init__()
                rates, outputs = [], None
                for _ in range(args.repeats):
                    outputs, decode, wall = run_requests(engine, [prompt] * n, params)
                    generated = sum(len(t) for t in outputs)
                    rates.append((generated - n) / decode if n == 1 else generated / wall)
                if method == "off":
                    baseline = outputs
                stats = engine.spec.stats if engine.spec is not None else None
                rate = statistics.median(rates)
                row = {"workload": workload, "streams": n, "method": method,
                       "tok_s": round(rate, 2), "tokens": len(outputs[0]),
                       "mean_accepted_length": round(stats.mean_accepted_length, 3) if stats else None,
                       "draft_tokens": stats.draft_tokens if stats else 0,
                       "accepted_tokens": stats.accepted_tokens if stats else 0,
                       "auto_off": stats.auto_off if stats else 0,
                       "identical": None if baseline is None else outputs == baseline,
                       **step_breakdown(engine)}
                off = next((r for r in rows if r["workload"] == workload and r["streams"] == n
                            and r["method"] == "off"), None)
                row["speedup"] = round(rate / off["tok_s"], 3) if off and off["tok_s"] else None
                # (not ngram: prompt lookup drafts only where the text recurs, not every step)
                if projections and stats and stats.verify_steps and row["speedup"] \
                        and configs[method].method != "ngram":
                    k = configs[method].k
                    row["projected_speedup"] = {
                        a: round(row["speedup"] * sum(a ** i for i in range(k + 1))
                                 / stats.mean_accepted_length, 3) for a in projections}
                rows.append(row)
                print(f"{workload:8s} streams {n:3d} {method:10s} {row['tok_s']:9.2f} tok/s "
                      f"x{row['speedup'] or 1:.2f}  accepted length "
                      f"{row['mean_accepted_length'] or '-'}  identical {row['identical']}  "
                      f"step {row['step_ms']} ms (device {row['device_ms']}, schedule "
                      f"{row['schedule_ms']}, forward {row['forward_ms']}, sample "
                      f"{row['sample_ms']}, output {row['output_ms']})",
                      file=sys.stderr, flush=True)

    head = "| workload | streams | method | tok/s | speedup | mean accepted length | identical |"
    lines = [head, "|" + " --- |" * 7]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['streams']} | {r['method']} | {r['tok_s']:.1f} | "
                     f"{r['speedup'] or 1:.2f}x | {r['mean_accepted_length'] or '-'} | "
                     f"{'-' if r['identical'] is None else ('yes' if r['identical'] else 'NO')} |")
    print("\n".join(lines))
    for r in rows:
        if "projected_speedup" in r:
            print(f"{r['workload']} streams {r['streams']} {r['method']}: projected speedup "
                  + ", ".join(f"{s:.2f}x at acceptance {a}" for a, s in r["projected_speedup"].items()))
    result = {"bench": "spec_decode", "code_version": code_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "device": device_name(runner), "model": args.model, "target": args.target,
              "dtype": args.dtype, "weights": served.quant or "not quantised",
              "batch_invariant": args.batch_invariant,
              "max_tokens": args.max_tokens, "repeats": args.repeats,
              "load_average_start": load_start, "load_average_end": load_average(),
              "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "rows": rows}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec_decode.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out / 'spec_decode.json'}", file=sys.stderr)
    return 0 if all(r["identical"] in (None, True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
