"""Prefill attention of two versions of kiln's attention module, against SDPA, in one
process and interleaved (A, B, SDPA per repeat), so that a kernel change is judged against
the same SDPA run rather than a number from another day. Timed as bench/kernels.py times
them (its median_s); the best of the repeats counts.

    python3 bench/attention_ab.py --modules attention,attention_prev --out ab.json

Each module name is under kiln.backends.triton (a copy of an older attention.py saved
there, say, by `git show REV:backends/triton/attention.py`). Causal, bf16, 32 query and
8 KV heads, head dim 128: the shapes of bench/kernels.py's attention rows."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

import torch

from kernels import median_s
from provenance import code_version

DEV, BF16 = "cuda", torch.bfloat16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--modules", default="attention,attention_prev")
    ap.add_argument("--seqs", default="4096,8192,16384")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    names = args.modules.split(",")
    mods = {n: importlib.import_module(f"kiln.backends.triton.{n}") for n in names}
    h, hkv, d = 32, 8, 128
    rows = []
    for s in map(int, args.seqs.split(",")):
        q = torch.randn(1, h, s, d, device=DEV, dtype=BF16)
        k = torch.randn(1, hkv, s, d, device=DEV, dtype=BF16)
        v = torch.randn(1, hkv, s, d, device=DEV, dtype=BF16)
        flops = 4 * s * s * d * h / 2
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                               enable_gqa=True)
        calls = {n: (lambda m=m: m.attention_prefill(q, k, v, None, d ** -0.5, True))
                 for n, m in mods.items()}
        calls["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True)
        for n in names:
            err = (calls[n]().float() - ref.float()).abs().max().item()
            assert err < 5e-2, (n, s, err)
        secs = {n: [] for n in calls}
        for _ in range(args.repeats):
            for n, fn in calls.items():
                secs[n].append(median_s(fn, rep=50))
        best = {n: min(v) for n, v in secs.items()}
        row = dict(seq=s, **{f"{n}_tflops": flops / t / 1e12 for n, t in best.items()},
                   **{f"{n}_frac_sdpa": best["sdpa"] / best[n] for n in names})
        rows.append(row)
        print(f"s={s:5d} " + "  ".join(f"{n} {row[n + '_tflops']:6.1f} TFLOP/s"
                                       + (f" ({row[n + '_frac_sdpa']:.3f} of sdpa)" if n in names else "")
                                       for n in calls), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           commit=code_version(), command=" ".join(sys.argv),
                           date=time.strftime("%Y-%m-%d"), rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
