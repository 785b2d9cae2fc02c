"""Decode-size matmuls with a fused prologue on a GPU: kiln's gemv launchers vs the unfused
pair they replace vs torch.mm alone.

    python bench/gemv.py --out $OUT/gemv.json [--quick] [--sweep]

For M = 1 and 8 tokens and the projections of SmolLM2-135M, Llama-3.2-1B and Llama-3-8B
(bf16, weights as nn.Linear's [N, K] passed permuted, as kiln graphs pass them), times
(a) the fused launcher (backends/triton/gemv.py), (b) the unfused pair: kiln's Triton norm
or silu_mul kernel, then torch.mm, and (c) torch.mm alone, each replayed from a CUDA graph
over rotating weight/input sets that together exceed the 50 MB L2 (a decode step streams
every weight from HBM once). Which prologue each projection gets, as in a Llama layer:
qkv and gate_up `fused_add_rms_norm_mm` (the residual add and the norm before them), down
`silu_mul_mm`, o `mm` (no prologue; its "unfused" time is torch.mm's). GB/s counts the bytes the fused kernel must move: the weight, its
inputs (x; x and residual; gate and up) and outputs (y; y and h), each once; the fraction
is of the measured device copy bandwidth. `--sweep` also times alternative tile configs
of the fused kernel and reports the best (to tune gemv.GEMV_CONFIGS); `--quick` runs the
first and last shape of each model. Importing this module does not touch CUDA.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from kiln.backends.triton import activation, gemv, norm
from kernels import copy_bandwidth, graph_s
from provenance import code_version

DEV = "cuda"
BF16 = torch.bfloat16
EPS = 1e-6
L2_BYTES = 256 * 2**20   # rotate over at least this much (5x the H100/H200 L2)

# (model, projection, K, N, launcher)
SHAPES = (
    ("smollm2-135m", "qkv", 576, 960, "fused_add_rms_norm_mm"),
    ("smollm2-135m", "o", 576, 576, "mm"),
    ("smollm2-135m", "gate_up", 576, 3072, "fused_add_rms_norm_mm"),
    ("smollm2-135m", "down", 1536, 576, "silu_mul_mm"),
    ("smollm2-135m", "lm_head", 576, 49152, "fused_add_rms_norm_mm"),
    ("llama-3.2-1b", "qkv", 2048, 3072, "fused_add_rms_norm_mm"),
    ("llama-3.2-1b", "o", 2048, 2048, "mm"),
    ("llama-3.2-1b", "gate_up", 2048, 16384, "fused_add_rms_norm_mm"),
    ("llama-3.2-1b", "down", 8192, 2048, "silu_mul_mm"),
    ("llama-3.2-1b", "lm_head", 2048, 128256, "fused_add_rms_norm_mm"),
    ("llama-3-8b", "qkv", 4096, 6144, "fused_add_rms_norm_mm"),
    ("llama-3-8b", "o", 4096, 4096, "mm"),
    ("llama-3-8b", "gate_up", 4096, 28672, "fused_add_rms_norm_mm"),
    ("llama-3-8b", "down", 14336, 4096, "silu_mul_mm"),
    ("llama-3-8b", "lm_head", 4096, 128256, "fused_add_rms_norm_mm"),
)
TOKENS = (1, 8)

G = gemv.GemvConfig
# Alternatives timed by --sweep, beside the table's own choice.
SWEEP = {
    1: (G(1, 4, 1024, 4, 2), G(1, 8, 1024, 4, 2), G(1, 8, 512, 4, 3), G(1, 16, 512, 4, 3),
        G(1, 16, 512, 4, 4), G(1, 16, 256, 4, 4), G(1, 32, 256, 4, 3), G(1, 32, 512, 8, 3)),
    16: (G(16, 16, 128, 4, 4), G(16, 16, 256, 4, 4), G(16, 16, 512, 4, 3), G(16, 32, 128, 4, 4),
         G(16, 32, 256, 4, 3), G(16, 64, 128, 4, 3), G(16, 16, 256, 8, 4)),
}


def quick_shapes():
    """The first and last projection of each model."""
    out = []
    for model in dict.fromkeys(s[0] for s in SHAPES):
        mine = [s for s in SHAPES if s[0] == model]
        out += [mine[0], mine[-1]]
    return out


def make_set(m: int, k: int, n: int, op: str) -> dict:
    """One weight and the inputs of one call."""
    w = torch.randn(n, k, device=DEV, dtype=BF16) * k ** -0.5
    s = dict(b=w.permute(1, 0), norm_w=torch.randn(k, device=DEV, dtype=BF16))
    if op == "silu_mul_mm":
        gu = torch.randn(m, 2 * k, device=DEV, dtype=BF16)
        s.update(gate=gu[:, :k], up=gu[:, k:])
    else:
        s.update(x=torch.randn(m, k, device=DEV, dtype=BF16),
                 r=torch.randn(m, k, device=DEV, dtype=BF16))
    return s


def fused_fn(op: str, cfg=None):
    if op == "rms_norm_mm":
        return lambda s: gemv.rms_norm_mm(s["x"], s["norm_w"], s["b"], EPS, config=cfg)
    if op == "fused_add_rms_norm_mm":
        return lambda s: gemv.fused_add_rms_norm_mm(s["x"], s["r"], s["norm_w"], s["b"], EPS,
                                                    config=cfg)[0]
    if op == "mm":
        return lambda s: gemv.mm(s["x"], s["b"], config=cfg)
    return lambda s: gemv.silu_mul_mm(s["gate"], s["up"], s["b"], config=cfg)


def unfused_fn(op: str):
    """kiln's own Triton prologue kernel, then torch.mm on the permuted weight (torch.mm
    alone for mm)."""
    if op == "mm":
        return lambda s: torch.mm(s["x"], s["b"])
    if op == "rms_norm_mm":
        return lambda s: torch.mm(norm.rms_norm(s["x"], s["norm_w"], EPS), s["b"])
    if op == "fused_add_rms_norm_mm":
        return lambda s: torch.mm(norm.fused_add_rms_norm(s["x"], s["r"], s["norm_w"], EPS)[0],
                                  s["b"])
    return lambda s: torch.mm(activation.silu_mul(s["gate"], s["up"]), s["b"])


def mm_fn(op: str):
    a = "gate" if op == "silu_mul_mm" else "x"
    return lambda s: torch.mm(s[a], s["b"])


def label(cfg) -> str:
    """BLOCK_M x BLOCK_N x BLOCK_K / warps / stages."""
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}/w{cfg.num_warps}/s{cfg.num_stages}"


def moved_bytes(m: int, k: int, n: int, op: str) -> int:
    acts = {"mm": 1, "rms_norm_mm": 1, "fused_add_rms_norm_mm": 3, "silu_mul_mm": 2}[op]  # [M, K] tensors
    return 2 * (n * k + acts * m * k + m * n)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def bench_shape(model, proj, k, n, op, m, bw, sweep: bool) -> dict:
    per = 2 * n * k
    nset = max(2, -(-L2_BYTES // per))
    sets = [make_set(m, k, n, op) for _ in range(nset)]
    calls = max(20, nset)   # every set at least once per replay: nothing stays in L2

    def timed(fn):
        return graph_s(lambda i: fn(sets[i % nset]), n=calls)

    cfg = gemv.gemv_config(m, n, k)
    err = rel_err(fused_fn(op)(sets[0]), unfused_fn(op)(sets[0]))
    t_fused, t_unfused, t_mm = timed(fused_fn(op)), timed(unfused_fn(op)), timed(mm_fn(op))
    nbytes = moved_bytes(m, k, n, op)
    row = dict(model=model, proj=proj, op=op, m=m, k=k, n=n, config=label(cfg),
               config_fields=dataclasses.asdict(cfg),
               fused_us=t_fused * 1e6, unfused_us=t_unfused * 1e6, mm_us=t_mm * 1e6,
               saved_us=(t_unfused - t_fused) * 1e6, fused_gbs=nbytes / t_fused / 1e9,
               fused_frac_copy_bw=nbytes / t_fused / bw, mm_frac_copy_bw=nbytes / t_mm / bw,
               rel_err_vs_unfused=err)
    if sweep:
        tried = []
        block_m = 1 if m == 1 else 16
        for alt in SWEEP[block_m]:
            if alt.block_m < m:
                continue
            alt = gemv.fit_config(alt, k)
            tried.append(dict(config=label(alt), us=timed(fused_fn(op, alt)) * 1e6))
        best = min(tried, key=lambda r: r["us"])
        row.update(sweep=tried, best_config=best["config"], best_us=best["us"],
                   best_frac_copy_bw=nbytes / (best["us"] * 1e-6) / bw)
    del sets
    torch.cuda.empty_cache()
    return row


HEADER = (f"{'model':13s} {'proj':7s} {'M':>2s} {'K':>5s} {'N':>5s} {'config':18s} "
          f"{'fused us':>8s} {'GB/s':>6s} {'of bw':>5s} {'unfused us':>10s} {'mm us':>7s} "
          f"{'mm bw':>5s} {'err':>7s}")


def print_row(r: dict) -> None:
    line = (f"{r['model']:13s} {r['proj']:7s} {r['m']:2d} {r['k']:5d} {r['n']:5d} "
            f"{r['config']:18s} {r['fused_us']:8.1f} {r['fused_gbs']:6.0f} "
            f"{r['fused_frac_copy_bw']:5.2f} {r['unfused_us']:10.1f} {r['mm_us']:7.1f} "
            f"{r['mm_frac_copy_bw']:5.2f} {r['rel_err_vs_unfused']:7.1e}")
    if "best_us" in r:
        line += f"  best {r['best_config']} {r['best_us']:.1f} us ({r['best_frac_copy_bw']:.2f})"
    print(line, flush=True)


def main(argv=None):
    # Time the fused kernel at every M it takes, not the launchers' choice for M > 1.
    gemv.FUSED_MAX_M = gemv.MAX_M
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--quick", action="store_true", help="two shapes per model")
    ap.add_argument("--sweep", action="store_true", help="also time alternative configs")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="M values, e.g. 1,8")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy {bw / 1e12:.2f} TB/s; per-call times of CUDA-graph replays; "
          "'of bw' = fused GB/s / copy bandwidth; unfused = kiln norm/act kernel + torch.mm",
          flush=True)
    print(HEADER, flush=True)
    rows = []
    shapes = quick_shapes() if args.quick else SHAPES
    for m in (int(t) for t in args.tokens.split(",")):
        for model, proj, k, n, op in shapes:
            rows.append(bench_shape(model, proj, k, n, op, m, bw, args.sweep))
            print_row(rows[-1])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=device, torch=torch.__version__, commit=code_version(),
                           command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d"),
                           copy_bw=bw, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
