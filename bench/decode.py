"""End-to-end batch-1 greedy decode: kiln vs eager vs torch.compile in the same loop.

    python bench/decode.py --model smollm2 --device cpu --tokens 64 --out bench/results/decode_cpu.json

Prints a table and writes JSON. Each backend gets a fresh dynamo state; "first call" is
the prefill call including capture/compilation (cold), "decode" the steady-state steps
after the first decode step (which compiles the decode graph), the median of `--repeats`
warm runs. `kiln` runs the loop's DirectDecode (the compiled graph called directly once two
steps showed how); `kiln-hf` calls the compiled model through torch.compile on every step.

Per backend it also reports host us per decode step (p50 of the call's wall time started
from an idle GPU) and, on a GPU, where a decode step's time goes, from torch.profiler: the
device events (kernels inside replayed CUDA graphs included) of a longer run minus those of
a shorter one, per extra step. That gives kernels per step (copies and fills not counted),
the GPU's busy time per step (the union of all device events, copies and fills included)
beside the step's wall time (from the decode tok/s; the rest is the GPU idle between
kernels), and a breakdown by kernel name (count and device us per step, names shortened
to a readable group: no return type, namespaces, template arguments or parameters). On the
CPU, or where the profiler cannot trace, these fields are null and `gpu_profile_error`
says why.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import traceback
from pathlib import Path

import torch

from kiln.generate import chat_input_ids, compile_model, greedy, make_cache
from provenance import code_version

PROMPT = "Write a short story about a robot who learns to paint."

# Real shapes, random weights (no downloads): Llama-3.2-1B and Llama-3-8B.
SHAPES = {
    # SmolLM2-135M's architecture, for machines without the GGUF (the GPU machine).
    "smollm2-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                          max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
                          tie_word_embeddings=True, initializer_range=0.1),
    # SmolLM2-1.7B's: the same vocabulary as SmolLM2-135M, a target for it to draft for.
    "smollm2-1.7b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                               num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
                               max_position_embeddings=8192, rms_norm_eps=1e-5,
                               rope_theta=130000.0, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=4096, rope_theta=500000.0),
}


def load(name: str, dtype, device):
    if name in SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[name])).to(dtype).eval()
        ids = torch.randint(0, 1000, (1, 32), device=device)
        return model, ids
    from kiln.frontends.hf import load as hf_load
    model, tok = hf_load(name, dtype=dtype)
    model = model.to(device)
    return model, chat_input_ids(tok, PROMPT).to(device)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--backends", default="eager,inductor,kiln")
    ap.add_argument("--kiln-options", default="{}",
                    help='JSON compile options for the kiln backend, e.g. \'{"quant": "int8"}\'')
    ap.add_argument("--repeats", type=int, default=5,
                    help="warm runs per backend; decode tok/s is their median")
    ap.add_argument("--out")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    results = []
    for name in args.model.split(","):
        results.append(bench_model(name, dtype, args))
        if args.out and args.out.endswith(".jsonl"):  # one line per model, appended
            with open(args.out, "a") as f:
                f.write(json.dumps(results[-1]) + "\n")
        elif args.out:  # after every model, so a run cut short keeps what it measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2))


# Kernels that only wrap another, named by their first template argument.
WRAPPER_KERNELS = {"Kernel", "Kernel2", "device_kernel"}


def short_kernel_name(name: str) -> str:
    """A readable group name for a device event: "void at::native::index_elementwise_kernel<128,
    4, ...>(long, ...)" -> "index_elementwise_kernel", "cutlass::Kernel2<cutlass_80_..._tn>(...)"
    -> "cutlass_80_..._tn", "Memcpy HtoD (Pageable -> Device)" -> "Memcpy HtoD"; Triton's and
    cuBLAS's flat names (triton_poi_fused_..., _rms_norm_kernel, nvjet_...) stay as they are."""
    name = name.strip().removeprefix("void ").replace("(anonymous namespace)::", "")
    cut = min((i for i in (name.find("<"), name.find("(")) if i >= 0), default=len(name))
    base = name[:cut].strip().split("::")[-1]
    if base in WRAPPER_KERNELS and name[cut:cut + 1] == "<":
        depth = 0
        for i, ch in enumerate(name[cut + 1:], cut + 1):
            if ch in "<(":
                depth += 1
            elif ch in ">)" and depth:
                depth -= 1
            elif ch in ",>" and not depth:
                return short_kernel_name(name[cut + 1:i])
    return base or name


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: time the GPU ran anything."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def device_events(fn, model, ids, cache, loop, tokens: int) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of every GPU event of one profiled greedy run: kernels,
    copies and fills, not the GPU-side spans of annotated regions (record_function), which
    cover other events and the gaps between them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        greedy(fn, model, ids, tokens, cache=cache, **loop)
        torch.cuda.synchronize()
    return [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]


def step_profile(fn, model, ids, cache, loop, short: int = 8, long: int = 24) -> dict:
    """What a decode step runs on the GPU: profile a short and a long run and divide the
    differences by the extra steps. kernels_per_step counts kernels (not copies or fills);
    gpu_us_per_step is the union of all device events; kernel_breakdown the 15 groups of
    `short_kernel_name` with the most device time (count and us per step; copies and fills
    are groups too, "Memcpy HtoD" and the like)."""
    try:
        runs = [device_events(fn, model, ids, cache, loop, n) for n in (short, long)]
        if not runs[1]:
            raise RuntimeError("the profiler recorded no GPU events")
    except Exception as e:  # noqa: BLE001 - a profiler that cannot trace here: say so in the row
        traceback.print_exc()
        return dict(kernels_per_step=None, gpu_us_per_step=None, kernel_breakdown=None,
                    gpu_profile_error=f"{type(e).__name__}: {e}"[:500])
    steps = long - short
    kernels = [sum(1 for n, _, _ in run if not any(w in n.lower() for w in ("memcpy", "memset")))
               for run in runs]
    groups = {}   # short name -> [count, us] of the long run minus the short one
    for sign, run in ((-1, runs[0]), (1, runs[1])):
        for n, a, b in run:
            g = groups.setdefault(short_kernel_name(n), [0, 0.0])
            g[0] += sign
            g[1] += sign * (b - a)
    per_step = sorted(((n, round(c / steps, 2), round(us / steps, 2))
                       for n, (c, us) in groups.items() if c > 0), key=lambda g: -g[2])
    return dict(kernels_per_step=round((kernels[1] - kernels[0]) / steps, 1),
                gpu_us_per_step=round((busy_us([(a, b) for _, a, b in runs[1]])
                                       - busy_us([(a, b) for _, a, b in runs[0]])) / steps, 1),
                kernel_breakdown=[dict(name=n, count_per_step=c, us_per_step=us)
                                  for n, c, us in per_step[:15]],
                gpu_profile_error=None)


def print_breakdown(row: dict) -> None:
    """A backend's step: wall time, GPU busy time and gaps, then the kernel groups."""
    if "error" in row:
        return
    if row["gpu_us_per_step"] is None:
        print(f"\n{row['backend']}: no GPU breakdown ({row['gpu_profile_error']})")
        return
    step, busy = row["step_us"], row["gpu_us_per_step"]
    split = (f"{busy:.1f} us GPU busy" if step is None else
             f"a step is {step:.1f} us, of which {busy:.1f} us GPU busy and {step - busy:.1f} us gaps")
    print(f"\n{row['backend']}: {split} ({row['kernels_per_step']} kernels)")
    print(f"  {'kernel':60s} {'per step':>8s} {'us/step':>9s}")
    for k in row["kernel_breakdown"]:
        print(f"  {k['name'][:60]:60s} {k['count_per_step']:8.2f} {k['us_per_step']:9.1f}")


def bench_model(name, dtype, args):
    model, ids = load(name, dtype, args.device)
    rows = []
    reference = None
    for backend in args.backends.split(","):
        torch._dynamo.reset()
        compiled = []
        opts = {"target": "cuda" if args.device == "cuda" else "cpu", "observer": compiled.append,
                **json.loads(args.kiln_options)}
        kind = backend.split("-hf")[0]
        fn = compile_model(model, kind, opts if kind == "kiln" else None)
        cache = make_cache(model, ids.shape[1] + args.tokens)
        # reduce-overhead as transformers recommends it: eager prefill, static decode shapes.
        loop = dict(prefill_fn=model, mark_dynamic=False) if backend == "reduce-overhead" else {}
        loop["direct"] = backend == "kiln"
        try:
            gen = greedy(fn, model, ids, args.tokens, cache=cache, **loop)
            # Warm runs on the same cache: steady state, no compilation or capture. Batch-1
            # decode of a small model is host-bound, so one run is noisy; report the median.
            warms = [greedy(fn, model, ids, args.tokens, cache=cache, **loop)
                     for _ in range(max(1, args.repeats))]
        except Exception as e:  # noqa: BLE001 - record it and measure the other backends
            traceback.print_exc()
            rows.append({"backend": backend, "error": f"{type(e).__name__}: {e}"[:500]})
            continue
        host = []
        greedy(fn, model, ids, args.tokens, cache=cache, host_us=host, **loop)
        if args.device == "cuda":
            profiled = step_profile(fn, model, ids, cache, loop)
        else:
            profiled = dict(kernels_per_step=None, gpu_us_per_step=None, kernel_breakdown=None,
                            gpu_profile_error=f"device {args.device}: no GPU to profile")
        rates = sorted(w.decode_tokens_per_second for w in warms)
        rate = statistics.median(rates)
        warm = warms[-1]
        if reference is None:
            reference = warm.tokens
        same = sum(a == b for a, b in zip(warm.tokens, reference)) / max(len(reference), 1)
        row = {
            "backend": backend,
            "first_call_s": round(gen.prefill_seconds, 3),
            "first_decode_s": round(gen.first_decode_seconds, 3),
            "kiln_compile_s": round(sum(c.compile_seconds for c in compiled), 3) if compiled else None,
            "decode_tok_s": round(rate, 2),
            "decode_tok_s_runs": [round(r, 2) for r in rates],
            "prefill_s_warm": round(warm.prefill_seconds, 4),
            "tokens_equal_to_first_backend": round(same, 3),
            "host_us_per_step_p50": round(statistics.median(host[3:]), 1),
            "step_us": round(1e6 / rate, 1) if rate else None,  # decode wall time per step
            **profiled,
            "direct": warm.direct,
        }
        rows.append(row)
    print(f"\nmodel={name} device={args.device} dtype={args.dtype} tokens={args.tokens} "
          f"torch={torch.__version__} commit={code_version()}")
    print(f"{'backend':10s} {'first call s':>12s} {'kiln compile s':>14s} {'decode tok/s':>12s} "
          f"{'prefill s':>10s} {'same tokens':>11s} {'host us/step':>12s} {'kernels/step':>12s}")
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:10s} FAILED: {r['error'][:200]}")
            continue
        kc = "-" if r["kiln_compile_s"] is None else f"{r['kiln_compile_s']:.2f}"
        print(f"{r['backend']:10s} {r['first_call_s']:12.2f} {kc:>14s} {r['decode_tok_s']:12.1f} "
              f"{r['prefill_s_warm']:10.3f} {r['tokens_equal_to_first_backend']:11.2f} "
              f"{r['host_us_per_step_p50']:12.1f} {str(r['kernels_per_step']):>12s}")
    for r in rows:
        print_breakdown(r)
    result = {"model": name, "device": args.device, "dtype": args.dtype,
              "kiln_options": json.loads(args.kiln_options),
              "tokens": args.tokens, "torch": torch.__version__, "commit": code_version(),
              "machine": platform.processor() or platform.machine(),
              "cpus": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "rows": rows,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


if __name__ == "__main__":
    main()
