"""The CPU target's TVM kernels against the torch code they compete with, per op, at
SmolLM2-135M's decode shapes (one token: M = 1; hidden 576, intermediate 1536, 9 query and
3 KV heads of 64, vocab 49152; q/k/v and gate/up merged as fuse.parallel_linear merges
them under weight-only quantisation).

    python bench/cpu_kernels.py [--json bench/results/cpu_kernels_tvm.json]
    python bench/cpu_kernels.py --accuracy     # SmolLM2 int4 with the TVM GEMV at every row

Each case times both sides in the same process, alternating, as the median of rounds of
back-to-back calls (output allocation included, as the generated wrapper pays it), and
prints which is faster. kiln.backends.cpu_kernels.TVM_OPS is set from this table: an op
goes to TVM when its kernel wins at every shape measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from kiln.backends import cpu_kernels
from kiln.backends.tvm import build as tvm_build
from kiln.ir import kiln_ref

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 576, 1536, 9, 3, 64, 49152
QKV = HIDDEN + 2 * KV_HEADS * HEAD_DIM


def _time(fn, calls: int, rounds: int) -> float:
    """Median microseconds a call over `rounds` rounds of `calls` calls."""
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def cases():
    """(op, shape label, TVM-side callable, torch-side callable) at decode shapes."""
    x = torch.randn(1, 1, HIDDEN)
    r = torch.randn(1, 1, HIDDEN)
    w = torch.randn(HIDDEN)
    yield "rms_norm", "[1,1,576]", lambda: cpu_kernels.rms_norm(x, w, 1e-5), lambda: kiln_ref.rms_norm(x, w, 1e-5)
    yield ("fused_add_rms_norm", "[1,1,576]", lambda: cpu_kernels.fused_add_rms_norm(x, r, w, 1e-5),
           lambda: kiln_ref.fused_add_rms_norm(x, r, w, 1e-5))
    # q and k as a decode step has them: views of the merged projection's output
    proj = torch.randn(1, 1, QKV)
    q = proj[..., :HIDDEN].view(1, 1, HEADS, HEAD_DIM).transpose(1, 2)
    k = proj[..., HIDDEN:HIDDEN + KV_HEADS * HEAD_DIM].view(1, 1, KV_HEADS, HEAD_DIM).transpose(1, 2)
    cos, sin = torch.randn(1, 1, HEAD_DIM), torch.randn(1, 1, HEAD_DIM)
    for name, t in (("q [1,9,1,64]", q), ("k [1,3,1,64]", k)):
        yield "rope", name, lambda t=t: cpu_kernels.rope(t, cos, sin), lambda t=t: kiln_ref.rope(t, cos, sin)
    gate_up = torch.randn(1, 1, 2 * INTER)
    gate, up = gate_up[..., :INTER], gate_up[..., INTER:]
    yield "silu_mul", "[1,1,1536]", lambda: cpu_kernels.silu_mul(gate, up), lambda: kiln_ref.silu_mul(gate, up)
    linears = [("q/k/v", QKV, HIDDEN), ("o", HIDDEN, HIDDEN), ("gate/up", 2 * INTER, HIDDEN),
               ("down", HIDDEN, INTER)]
    for label, n, kk in linears:
        w_q, w_sz = cpu_kernels.quant_int4(torch.randn(n, kk) * 0.05, 32, torch.bfloat16)
        xv = torch.randn(1, kk)
        yield ("weight_int4_mm", f"{label} {n}x{kk}", lambda xv=xv, a=w_q, b=w_sz: cpu_kernels.weight_int4_mm(xv, a, b, None),
               lambda xv=xv, a=w_q, b=w_sz: cpu_kernels.weight_int4_mm_torch(xv, a, b, None))
    for label, n, kk in linears + [("LM head", VOCAB, HIDDEN)]:
        w_q, w_scale = kiln_ref.quant_int8(torch.randn(n, kk) * 0.05)
        xv = torch.randn(1, kk)
        yield ("weight_int8_mm", f"{label} {n}x{kk}", lambda xv=xv, a=w_q, b=w_scale: cpu_kernels.weight_int8_mm(xv, a, b, None),
               lambda xv=xv, a=w_q, b=w_scale: cpu_kernels.weight_int8_mm_torch(xv, a, b, None))


def accuracy() -> dict:
    """Teacher-forced top-1 agreement with fp32 and perplexity of SmolLM2 with int4 weights
    when every int4 GEMM is the TVM kernel (all rows of a prefill, which the cpu target
    gives torch's kernel), over tests/passes/test_quantize.py's four texts (64 tokens
    each): the accuracy of the decode path the TVM GEMV serves, where x stays float32."""
    tests = Path(__file__).resolve().parents[1] / "tests"
    sys.path[:0] = [str(tests), str(tests / "passes")]
    from test_quantize import TEXTS

    from kiln.frontends.hf import load
    model, tok = load("smollm2")
    ids = torch.stack([tok(t, return_tensors="pt")["input_ids"][0, :64] for t in TEXTS])
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits

    def every_row_on_tvm(x, w_q, w_sz, bias, group_size=32):
        n, k = w_q.shape[0], w_q.shape[1] * 2
        fn = tvm_build.get("weight_int4_mv", dict(k=k, n=n, group_size=group_size,
                                                   scale_dtype=str(w_sz.dtype).split(".")[-1]))
        y = torch.empty(x.shape[0], n)
        fn(x.contiguous(), w_q, w_sz, y)
        return y if bias is None else y + bias.float()
    out = {}
    for name, impl in (("torch kernel (bf16 halves)", cpu_kernels.weight_int4_mm_torch),
                       ("TVM kernel (fp32 x)", every_row_on_tvm)):
        cpu_kernels.weight_int4_mm = impl      # what the generated wrapper imports
        torch._dynamo.reset()
        fn = torch.compile(model, backend="kiln", options={"quant": "int4_weight_only", "cache": False})
        with torch.no_grad():
            logits = fn(input_ids=ids, use_cache=False).logits
        agree = (logits.argmax(-1) == ref.argmax(-1)).float()
        nll = lambda lg: torch.nn.functional.cross_entropy(            # noqa: E731
            lg[:, :-1].reshape(-1, lg.shape[-1]).float(), ids[:, 1:].reshape(-1)).exp().item()
        out[name] = {"top1": round(agree.mean().item(), 4), "differ": int((1 - agree).sum()),
                     "of": agree.numel(), "perplexity": round(nll(logits), 3),
                     "perplexity_fp32": round(nll(ref), 3)}
        print(name, out[name])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the table here")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--accuracy", action="store_true", help="SmolLM2 int4 top-1 and perplexity "
                    "with the TVM GEMV, instead of the timings")
    args = ap.parse_args()
    tvm_build.require()
    if args.accuracy:
        accuracy()
        return 0
    cpu_kernels.TVM_OPS = frozenset({"rms_norm", "fused_add_rms_norm", "rope", "silu_mul",
                                     "weight_int4_mm", "weight_int8_mm"})
    rows = []
    print(f"{'op':20s} {'shape':24s} {'tvm us':>9s} {'torch us':>9s}  faster")
    for op, shape, tvm_fn, torch_fn in cases():
        tvm_fn(), torch_fn()                             # build / load, warm up
        counts = tvm_build.counts(reset=True)
        tvm_fn()
        assert tvm_build.counts().get(f"tvm:{op}") == 1, f"{op} {shape} did not run on TVM"
        once = _time(torch_fn, 1, 3)
        calls = max(3, min(2000, int(20000 / max(once, 1.0))))   # ~20 ms a round
        t_tvm, t_torch = [], []
        for _ in range(3):                               # alternate the two sides
            t_tvm.append(_time(tvm_fn, calls, args.rounds // 3))
            t_torch.append(_time(torch_fn, calls, args.rounds // 3))
        row = {"op": op, "shape": shape, "tvm_us": round(statistics.median(t_tvm), 2),
               "torch_us": round(statistics.median(t_torch), 2)}
        row["faster"] = "tvm" if row["tvm_us"] < row["torch_us"] else "torch"
        rows.append(row)
        print(f"{op:20s} {shape:24s} {row['tvm_us']:9.2f} {row['torch_us']:9.2f}  {row['faster']}")
        del counts
    by_op = {}
    for row in rows:
        by_op.setdefault(row["op"], []).append(row["faster"] == "tvm")
    chosen = sorted(op for op, wins in by_op.items() if all(wins))
    print(f"TVM wins at every shape: {', '.join(chosen) or '-'}")
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
            "command": "python " + " ".join(sys.argv), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(), "tvm": __import__("tvm").__version__,
            "torch": torch.__version__, "rows": rows, "tvm_wins_everywhere": chosen}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
