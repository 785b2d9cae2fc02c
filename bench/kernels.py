"""Kernel benchmarks on a GPU: kiln's Triton kernels vs eager PyTorch vs torch.compile.

    python bench/kernels.py --out $OUT/kernels.json

Memory-bound kernels are reported in GB/s and as a fraction of the measured device copy
bandwidth (bytes read + written). Their eager and torch.compile baselines run the PyTorch
code a model runs for the op, transformers' Llama modeling code (LlamaRMSNorm,
LlamaDecoderLayer's residual add, LlamaMLP's activation, apply_rotary_pos_emb on q and k,
which kiln's rope_pair kernel rotates in one launch), not kiln's reference functions: that
is the code torch.compile compiles in a model. The fp8 quantisation ops have no transformers
module, so their baselines run kiln_ref; every row names its baseline ("baseline"). Each
baseline is first checked against kiln_ref on the kiln kernel's own inputs.

Attention prefill and GEMMs in TFLOP/s beside SDPA / cuBLAS / torch._scaled_mm; decode
attention and paged decode attention in GB/s of KV read, timed as CUDA-graph replays
(decode runs captured). Medians of device-event timings after warm-up.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from typing import Callable

import torch
from triton.testing import do_bench

from kiln.backends import paged_attention as torch_paged
from kiln.backends.triton import activation, attention, gemm, moe, norm, quant, rope
from kiln.backends.triton import paged_attention as triton_paged
from kiln.ir import kiln_ref
from provenance import code_version

DEV = "cuda"
BF16 = torch.bfloat16


def median_s(fn, rep=100) -> float:
    return do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e-3


def graph_s(fn, n=20) -> float:
    """Per-call time of `fn` replayed n times inside one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n):
            fn(i)
    return median_s(g.replay, rep=200) / n


def copy_bandwidth() -> float:
    x = torch.empty(2 * 1024**3 // 2, dtype=BF16, device=DEV)
    y = torch.empty_like(x)
    bw = 2 * x.numel() * 2 / median_s(lambda: y.copy_(x))
    del x, y
    return bw


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    b = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    return 2 * 8192**3 / median_s(lambda: a @ b)


class ResidualRMSNorm(torch.nn.Module):
    """LlamaDecoderLayer's residual add and the norm that follows it (its LlamaRMSNorm):
    returns (normed sum, sum), what kiln's fused_add_rms_norm computes."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x, residual):
        h = residual + x
        return self.norm(h), h


class SiluMul(torch.nn.Module):
    """LlamaMLP's activation, `act_fn(gate_proj(x)) * up_proj(x)`, on the projections'
    outputs."""

    def __init__(self, act_fn: torch.nn.Module):
        super().__init__()
        self.act_fn = act_fn

    def forward(self, gate, up):
        return self.act_fn(gate) * up


@dataclass
class Case:
    """One memory-bound op at one size: kiln's kernel on `args`, kiln_ref's definition of the
    op on the same args, and the baseline (eager and torch.compile) on `model_args`, the
    same tensors as a model's code takes them."""
    name: str
    kiln: Callable
    args: tuple
    ref: Callable
    baseline: str
    model: Callable
    model_args: tuple
    nbytes: int


def memory_bound_cases(tokens: int, hidden: int) -> list[Case]:
    """The memory-bound ops on fresh random bf16 inputs of `tokens` x `hidden`."""
    # Imported here, not at the top: transformers looks for the Hugging Face `kernels`
    # package by importing `kernels`, which is this file wherever bench/ is on sys.path
    # (bench/decode.py too), and a module-level import would make that import circular.
    from transformers.activations import ACT2FN
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    x = torch.randn(tokens, hidden, device=DEV, dtype=BF16)
    r = torch.randn(tokens, hidden, device=DEV, dtype=BF16)
    w = torch.randn(hidden, device=DEV, dtype=BF16)
    gu = torch.randn(tokens, 2 * hidden, device=DEV, dtype=BF16)
    gate, up = gu[:, :hidden], gu[:, hidden:]
    e = tokens * hidden * 2  # one bf16 activation tensor
    # q and k as the attention layer hands them to RoPE: [B, H, S, D] transposes of the
    # projections, 8 KV heads as in Llama-3-8B/70B; cos/sin [B, S, D].
    heads, kv_heads, hd = hidden // 128, 8, 128
    q = torch.randn(1, tokens, heads, hd, device=DEV, dtype=BF16).transpose(1, 2)
    k = torch.randn(1, tokens, kv_heads, hd, device=DEV, dtype=BF16).transpose(1, 2)
    cos = torch.randn(1, tokens, hd, device=DEV, dtype=BF16)
    sin = torch.randn(1, tokens, hd, device=DEV, dtype=BF16)
    f8 = torch.float8_e4m3fn
    eps = 1e-6

    def llama_rms_norm():
        """transformers' LlamaRMSNorm with `w` as its weight (frozen, as in inference)."""
        norm = LlamaRMSNorm(hidden, eps)
        norm.weight = torch.nn.Parameter(w, requires_grad=False)
        return norm

    def ref_baseline(name, kfn, ref_name, rfn, args, nbytes):
        """A quantisation op: transformers has no module for it, so kiln_ref is the baseline."""
        return Case(name, kfn, args, rfn, f"kiln_ref.{ref_name} (no transformers module)",
                    rfn, args, nbytes)
    return [
        Case("rms_norm", norm.rms_norm, (x, w, eps), kiln_ref.rms_norm,
             "transformers LlamaRMSNorm", llama_rms_norm(), (x,), 2 * e),
        Case("fused_add_rms_norm", norm.fused_add_rms_norm, (x, r, w, eps),
             kiln_ref.fused_add_rms_norm, "transformers LlamaDecoderLayer's add + LlamaRMSNorm",
             ResidualRMSNorm(llama_rms_norm()), (x, r), 4 * e),
        Case("silu_mul", activation.silu_mul, (gate, up), kiln_ref.silu_mul,
             'transformers LlamaMLP ACT2FN["silu"](gate) * up', SiluMul(ACT2FN["silu"]),
             (gate, up), 3 * e),
        Case("rope_pair", rope.rope_pair, (q, k, cos, sin), kiln_ref.rope_pair,
             "transformers apply_rotary_pos_emb", apply_rotary_pos_emb, (q, k, cos, sin),
             2 * (q.numel() + k.numel()) * 2 + 4 * tokens * hd),
        ref_baseline("quant_fp8", lambda t: quant.quant_fp8(t, None, f8), "quant_fp8",
                     lambda t: kiln_ref.quant_fp8(t, None, f8), (x,), e + e // 2 + tokens * 4),
        ref_baseline("rms_norm_quant_fp8", lambda t, ww: quant.rms_norm_quant(t, ww, eps, f8),
                     "rms_norm_quant", lambda t, ww: kiln_ref.rms_norm_quant(t, ww, eps, f8),
                     (x, w), e + e // 2 + tokens * 4),
        ref_baseline("silu_mul_quant_fp8", lambda g, u: quant.silu_mul_quant(g, u, f8),
                     "silu_mul_quant", lambda g, u: kiln_ref.silu_mul_quant(g, u, f8), (gate, up),
                     2 * e + e // 2 + tokens * 4),
    ]


def check_baseline(case: Case) -> None:
    """The baseline computes kiln_ref's op from the kiln kernel's inputs (same layouts)."""
    if case.model is not case.ref:
        torch.testing.assert_close(case.model(*case.model_args), case.ref(*case.args),
                                   msg=lambda m: f"{case.name}: {case.baseline} differs from "
                                                 f"kiln_ref.{case.ref.__name__}: {m}")


def bench_memory_bound(bw, rows):
    """Each kernel timed twice: launched eagerly back to back on one input (host launch
    cost included, the input partly L2-resident at 4096 tokens), and replayed from a CUDA
    graph over rotating inputs that together exceed the 50 MB L2 (device time only, as
    decode runs it). Baselines are launched eagerly on the one input."""
    for tokens in (4096, 32768):
        for hidden in (4096, 8192):
            cases = memory_bound_cases(tokens, hidden)
            nset = max(2, -(-256 * 2**20 // min(c.nbytes for c in cases)))
            rotating = [cases] + [memory_bound_cases(tokens, hidden) for _ in range(nset - 1)]
            for idx, c in enumerate(cases):
                check_baseline(c)
                compiled = torch.compile(c.model, dynamic=True)
                tk = median_s(lambda: c.kiln(*c.args))
                tg = graph_s(lambda i: c.kiln(*rotating[i % nset][idx].args), n=max(20, nset))
                te = median_s(lambda: c.model(*c.model_args))
                tc = median_s(lambda: compiled(*c.model_args))
                row = dict(kind="memory", op=c.name, tokens=tokens, hidden=hidden,
                           baseline=c.baseline, kiln_us=tk * 1e6, kiln_graph_us=tg * 1e6,
                           eager_us=te * 1e6, compile_us=tc * 1e6, kiln_gbs=c.nbytes / tk / 1e9,
                           frac_copy_bw=c.nbytes / tk / bw, graph_frac_copy_bw=c.nbytes / tg / bw,
                           compile_frac_copy_bw=c.nbytes / tc / bw)
                rows.append(row)
                print(f"{c.name:20s} {tokens:6d}x{hidden:<5d} kiln {tk*1e6:8.1f} us "
                      f"{row['frac_copy_bw']:5.2f} of copy bw, graph-replayed {tg*1e6:8.1f} us "
                      f"{row['graph_frac_copy_bw']:5.2f} | eager {te*1e6:8.1f} | "
                      f"torch.compile {tc*1e6:8.1f} ({row['compile_frac_copy_bw']:.2f}) "
                      f"[{c.baseline}]", flush=True)
            del rotating, cases
            torch.cuda.empty_cache()


def bench_attention(bw, rows):
    h, hkv, d = 32, 8, 128
    for s in (4096, 8192, 16384):
        q = torch.randn(1, h, s, d, device=DEV, dtype=BF16)
        k = torch.randn(1, hkv, s, d, device=DEV, dtype=BF16)
        v = torch.randn(1, hkv, s, d, device=DEV, dtype=BF16)
        flops = 4 * s * s * d * h / 2  # causal
        tk = median_s(lambda: attention.attention(q, k, v, None, d ** -0.5, True), rep=50)
        ts = median_s(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True), rep=50)
        row = dict(kind="prefill_attention", seq=s, heads=h, kv_heads=hkv, head_dim=d,
                   kiln_tflops=flops / tk / 1e12, sdpa_tflops=flops / ts / 1e12, frac_sdpa=ts / tk)
        rows.append(row)
        print(f"prefill attn s={s:5d} kiln {row['kiln_tflops']:6.1f} TFLOP/s  sdpa "
              f"{row['sdpa_tflops']:6.1f}  ratio {row['frac_sdpa']:.2f}", flush=True)
    for b, skv in ((1, 8192), (8, 8192), (1, 32768), (8, 32768)):
        per = 2 * b * hkv * skv * d * 2
        nset = max(2, -(-256 * 2**20 // per))  # rotate past the 50 MB L2
        sets = [(torch.randn(b, 1, h, d, device=DEV, dtype=BF16).transpose(1, 2),
                 torch.randn(b, hkv, skv, d, device=DEV, dtype=BF16),
                 torch.randn(b, hkv, skv, d, device=DEV, dtype=BF16)) for _ in range(nset)]
        tk = graph_s(lambda i: attention.attention(*sets[i % nset], None, d ** -0.5, False))
        ts = graph_s(lambda i: torch.nn.functional.scaled_dot_product_attention(
            *sets[i % nset], enable_gqa=True))
        row = dict(kind="decode_attention", batch=b, context=skv, kiln_us=tk * 1e6,
                   sdpa_us=ts * 1e6, frac_copy_bw=per / tk / bw, sdpa_frac_copy_bw=per / ts / bw)
        rows.append(row)
        print(f"decode attn b={b} ctx={skv:5d} kiln {tk*1e6:7.1f} us ({row['frac_copy_bw']:.2f} of bw)"
              f"  sdpa {ts*1e6:7.1f} us ({row['sdpa_frac_copy_bw']:.2f})", flush=True)


PREFILL_SWEEP = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3),
                 (64, 128, 4, 3), (128, 128, 4, 3), (64, 64, 4, 4), (128, 64, 8, 4)]
DECODE_SWEEP = [(16, 64, 4, 3), (16, 128, 4, 3), (16, 64, 4, 4), (16, 128, 8, 3), (16, 32, 4, 4)]


def sweep_attention(bw, rows):
    """Every tile config in PREFILL_SWEEP / DECODE_SWEEP (block_m, block_n, warps, stages) and
    decode partition sizes on this device: what the tables in backends/triton/attention.py
    are chosen from. Rows carry the config; failures (shared memory) are recorded."""
    h, hkv, d = 32, 8, 128
    for s in (4096, 8192, 16384):
        q = torch.randn(1, h, s, d, device=DEV, dtype=BF16)
        k = torch.randn(1, hkv, s, d, device=DEV, dtype=BF16)
        v = torch.randn(1, hkv, s, d, device=DEV, dtype=BF16)
        flops = 4 * s * s * d * h / 2
        ts = median_s(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True), rep=50)
        for cfg in PREFILL_SWEEP:
            c = attention.AttnConfig(*cfg)
            try:
                tk = median_s(lambda: attention.attention_prefill(q, k, v, None, d ** -0.5, True,
                                                                  config=c), rep=50)
            except Exception as e:  # noqa: BLE001  (a config that does not fit is a result)
                rows.append(dict(kind="prefill_sweep", seq=s, config=cfg, error=str(e)[:200]))
                print(f"prefill sweep s={s} {cfg}: {type(e).__name__}", flush=True)
                continue
            rows.append(dict(kind="prefill_sweep", seq=s, config=cfg, kiln_tflops=flops / tk / 1e12,
                             sdpa_tflops=flops / ts / 1e12, frac_sdpa=ts / tk))
            print(f"prefill sweep s={s:5d} {cfg}: {flops/tk/1e12:6.1f} TFLOP/s, sdpa "
                  f"{flops/ts/1e12:6.1f}, ratio {ts/tk:.3f}", flush=True)
    for b, skv in ((1, 8192), (1, 32768), (8, 8192)):
        per = 2 * b * hkv * skv * d * 2
        nset = max(2, -(-256 * 2**20 // per))
        sets = [(torch.randn(b, 1, h, d, device=DEV, dtype=BF16).transpose(1, 2),
                 torch.randn(b, hkv, skv, d, device=DEV, dtype=BF16),
                 torch.randn(b, hkv, skv, d, device=DEV, dtype=BF16)) for _ in range(nset)]
        ts = graph_s(lambda i: torch.nn.functional.scaled_dot_product_attention(
            *sets[i % nset], enable_gqa=True))
        for cfg in DECODE_SWEEP:
            c = attention.AttnConfig(*cfg)
            for split in (None, 256, 512, 1024, 2048):
                if split is not None and split % c.block_n:
                    continue
                try:
                    tk = graph_s(lambda i: attention.attention_decode(
                        *sets[i % nset], None, d ** -0.5, False, config=c, split=split))
                except Exception as e:  # noqa: BLE001
                    print(f"decode sweep b={b} {cfg} split={split}: {type(e).__name__}", flush=True)
                    continue
                rows.append(dict(kind="decode_sweep", batch=b, context=skv, config=cfg, split=split,
                                 kiln_us=tk * 1e6, frac_copy_bw=per / tk / bw,
                                 sdpa_us=ts * 1e6, sdpa_frac_copy_bw=per / ts / bw))
                print(f"decode sweep b={b} ctx={skv} {cfg} split={split}: {tk*1e6:6.1f} us "
                      f"({per/tk/bw:.2f} of bw; sdpa {ts*1e6:6.1f} us, {per/ts/bw:.2f})", flush=True)
        del sets
        torch.cuda.empty_cache()


def paged_decode_sets(b: int, ctx: int, hq: int, hkv: int, d: int, bs: int = 16):
    """Decode batches over one shared paged KV pool: enough sets (each b sequences of ctx
    tokens, every sequence in its own shuffled blocks) that one pass over them reads more
    than the 50 MB L2. Returns (k_cache, v_cache, sets, KV bytes one call reads)."""
    per = 2 * b * ctx * hkv * d * 2
    nset = max(2, -(-256 * 2**20 // per))
    nblk = -(-ctx // bs)
    num_blocks = nset * b * nblk
    k_cache = torch.randn(num_blocks, bs, hkv, d, device=DEV, dtype=BF16)
    v_cache = torch.randn(num_blocks, bs, hkv, d, device=DEV, dtype=BF16)
    perm = torch.randperm(num_blocks, device=DEV).to(torch.int32).view(nset, b, nblk)
    sets = []
    for i in range(nset):
        tables = perm[i].contiguous()
        last = ctx - 1   # the new token's position
        slots = tables[:, last // bs].long() * bs + last % bs
        sets.append((torch.randn(b, hq, d, device=DEV, dtype=BF16),
                     torch.randn(b, hkv, d, device=DEV, dtype=BF16),
                     torch.randn(b, hkv, d, device=DEV, dtype=BF16),
                     slots, tables, torch.full((b,), ctx, dtype=torch.int32, device=DEV),
                     torch.arange(b + 1, dtype=torch.int32, device=DEV)))
    return k_cache, v_cache, sets, per


def paged_decode_times(b: int, ctx: int, hq: int, hkv: int, d: int) -> tuple[float, float, int]:
    """(Triton s, torch s, KV bytes) per decode call, both replayed from CUDA graphs."""
    kc, vc, sets, per = paged_decode_sets(b, ctx, hq, hkv, d)
    n = max(20, len(sets))   # every set once per replay: nothing stays in L2

    def call(impl):
        return lambda i: impl(*sets[i % len(sets)][:3], kc, vc, *sets[i % len(sets)][3:],
                              scale=d ** -0.5)
    return (graph_s(call(triton_paged.paged_attention), n),
            graph_s(call(torch_paged.paged_attention), n), per)


def bench_paged_decode(bw, rows):
    """kiln.paged_attention on decode batches (one token per sequence, block size 16,
    block tables exactly as wide as the context): the Triton kernel vs the torch
    implementation (backends/paged_attention.py), as the runtime replays decode steps."""
    for model, hq, hkv, d in (("smollm2-135m", 9, 3, 64), ("llama-3.2-1b", 32, 8, 64)):
        for b in (1, 16, 64):
            for ctx in (1024, 8192):
                tk, tt, per = paged_decode_times(b, ctx, hq, hkv, d)
                row = dict(kind="paged_decode_attention", model=model, batch=b, context=ctx,
                           heads=hq, kv_heads=hkv, head_dim=d, kiln_us=tk * 1e6, torch_us=tt * 1e6,
                           kiln_gbs=per / tk / 1e9, frac_copy_bw=per / tk / bw,
                           torch_frac_copy_bw=per / tt / bw, speedup=tt / tk)
                rows.append(row)
                print(f"paged decode {model:13s} b={b:2d} ctx={ctx:5d} kiln {tk*1e6:7.1f} us "
                      f"({row['frac_copy_bw']:.2f} of bw)  torch {tt*1e6:7.1f} us "
                      f"({row['torch_frac_copy_bw']:.2f})  x{row['speedup']:.1f}", flush=True)


def bench_gemm_moe(rate, rows):
    m, n, k = 4096, 8192, 4096
    for qd in (torch.int8, torch.float8_e4m3fn):
        a, asc = kiln_ref.quantize(torch.randn(m, k, device=DEV), qd)
        b, bsc = kiln_ref.quantize_weight(torch.randn(n, k, device=DEV), qd)
        tk = median_s(lambda: gemm.scaled_mm(a, asc, b, bsc, None, BF16))
        if qd == torch.int8:
            tt = median_s(lambda: torch._int_mm(a, b.t()))
        else:
            tt = median_s(lambda: torch._scaled_mm(a, b.t(), scale_a=asc, scale_b=bsc.t(), out_dtype=BF16))
        ab = torch.randn(m, k, device=DEV, dtype=BF16)
        bb = torch.randn(n, k, device=DEV, dtype=BF16)
        tb = median_s(lambda: ab @ bb.t())
        flops = 2 * m * n * k
        row = dict(kind="scaled_mm", dtype=str(qd), m=m, n=n, k=k, kiln_tflops=flops / tk / 1e12,
                   torch_tflops=flops / tt / 1e12, bf16_cublas_tflops=flops / tb / 1e12)
        rows.append(row)
        print(f"scaled_mm {str(qd):22s} kiln {row['kiln_tflops']:7.1f}  torch {row['torch_tflops']:7.1f}"
              f"  bf16 cuBLAS {row['bf16_cublas_tflops']:7.1f} TFLOP/s", flush=True)
    e, hdim, idim, topk = 8, 4096, 7168, 2
    wgu = torch.randn(e, 2 * idim, hdim, device=DEV, dtype=BF16) * 0.02
    wd = torch.randn(e, hdim, idim, device=DEV, dtype=BF16) * 0.02
    for t in (1, 16, 4096):
        x = torch.randn(t, hdim, device=DEV, dtype=BF16)
        logits = torch.randn(t, e, device=DEV, dtype=BF16)
        tk = median_s(lambda: moe.fused_moe(x, logits, wgu, wd, topk, True), rep=50)
        flops = 2 * t * topk * (2 * idim * hdim + idim * hdim)
        row = dict(kind="fused_moe", tokens=t, experts=e, hidden=hdim, inter=idim, top_k=topk,
                   kiln_us=tk * 1e6, kiln_tflops=flops / tk / 1e12)
        rows.append(row)
        print(f"fused_moe tokens={t:5d} {tk*1e6:8.1f} us  {row['kiln_tflops']:6.1f} TFLOP/s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--only", default="memory,attention,paged,gemm",
                    help="comma-separated parts; also attention-sweep (tile configs)")
    args = ap.parse_args()
    torch.manual_seed(0)
    bw, rate = copy_bandwidth(), matmul_rate()
    print(f"{torch.cuda.get_device_name()}: copy {bw/1e12:.2f} TB/s, bf16 matmul {rate/1e12:.0f} TFLOP/s",
          flush=True)
    rows = []
    parts = args.only.split(",")
    if "memory" in parts:
        bench_memory_bound(bw, rows)
    if "attention" in parts:
        bench_attention(bw, rows)
    if "attention-sweep" in parts:
        sweep_attention(bw, rows)
    if "paged" in parts:
        bench_paged_decode(bw, rows)
    if "gemm" in parts:
        bench_gemm_moe(rate, rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           transformers=version("transformers"), commit=code_version(),
                           command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d"),
                           copy_bw=bw, matmul_rate=rate, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
