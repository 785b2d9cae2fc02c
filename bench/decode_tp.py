"""Batch-1 decode under tensor parallelism: TP=1 against TP=N, with the all-reduce + add +
RMSNorm fusion (fuse.collective) on and off, on the same random-weight model shape.

    python bench/decode_tp.py --model llama-3-8b --tp 1,2 --out $OUT/decode_tp.json

Each TP=N row runs N processes, one per GPU (NCCL), each compiling the model with
torch.compile(backend="kiln", options={"tensor_parallel_size": N}) and running the same
greedy StaticCache loop as bench/decode.py; rank 0 reports. The ranks build the same
random weights from one seed, so each holds the full model and shards it at compile time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import SHAPES  # noqa: E402
from provenance import code_version  # noqa: E402


def run_rank(rank: int, size: int, port: int, args, fused: bool, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(size), LOCAL_RANK=str(rank))
    if not fused:
        os.environ["KILN_DISABLE_PASSES"] = "fuse.collective"
    torch.cuda.set_device(rank)
    if size > 1:
        dist.init_process_group("nccl", rank=rank, world_size=size,
                                device_id=torch.device("cuda", rank))
    from transformers import LlamaConfig, LlamaForCausalLM

    from kiln.generate import compile_model, greedy, make_cache
    try:
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[args.model])).to(torch.bfloat16).eval()
        ids = torch.randint(0, 1000, (1, 32), device="cuda")
        compiled = []
        opts = {"target": "cuda", "observer": compiled.append}
        if size > 1:
            opts["tensor_parallel_size"] = size
        fn = compile_model(model, "kiln", opts)
        cache = make_cache(model, ids.shape[1] + args.tokens)
        first = greedy(fn, model, ids, args.tokens, cache=cache)
        warms = [greedy(fn, model, ids, args.tokens, cache=cache) for _ in range(args.repeats)]
        rates = sorted(w.decode_tokens_per_second for w in warms)
        ops = [n.op for c in compiled for n in c.graph.nodes]
        row = dict(tp=size, fused_collective=fused, decode_tok_s=round(statistics.median(rates), 2),
                   decode_tok_s_runs=[round(r, 2) for r in rates],
                   first_call_s=round(first.prefill_seconds, 2), tokens=warms[-1].tokens,
                   all_reduce_ops=sum(o.startswith("kiln.all_reduce") for o in ops),
                   fused_collective_ops=sum(o == "kiln.all_reduce_add_rms_norm" for o in ops),
                   replays=[getattr(c, "replays", None) for c in compiled][-1])
    except Exception as e:  # noqa: BLE001 - a failed configuration is a row
        traceback.print_exc()
        row = dict(tp=size, fused_collective=fused, error=f"{type(e).__name__}: {e}"[:800])
    if rank == 0:
        queue.put(row)
    if size > 1:
        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b", choices=sorted(SHAPES))
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for size in (int(x) for x in args.tp.split(",")):
        for fused in ((True,) if size == 1 else (True, False)):
            queue = ctx.Queue()
            with __import__("socket").socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            procs = [ctx.Process(target=run_rank, args=(r, size, port, args, fused, queue))
                     for r in range(size)]
            for p in procs:
                p.start()
            row = queue.get(timeout=900)
            for p in procs:
                p.join(timeout=120)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
    base = next((r for r in rows if r.get("tp") == 1 and "error" not in r), None)
    print(f"\nmodel={args.model} tokens={args.tokens} torch={torch.__version__} "
          f"commit={code_version()} device={torch.cuda.get_device_name()} x{torch.cuda.device_count()}")
    print(f"{'TP':>3s} {'fused AR+norm':>14s} {'decode tok/s':>12s} {'vs TP=1':>8s} {'same tokens':>11s}")
    for r in rows:
        if "error" in r:
            print(f"{r['tp']:3d} {str(r['fused_collective']):>14s} FAILED: {r['error'][:200]}")
            continue
        speed = r["decode_tok_s"] / base["decode_tok_s"] if base else float("nan")
        same = (sum(a == b for a, b in zip(r["tokens"], base["tokens"])) / len(base["tokens"])
                if base else float("nan"))
        print(f"{r['tp']:3d} {str(r['fused_collective']):>14s} {r['decode_tok_s']:12.1f} "
              f"{speed:8.2f} {same:11.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(
            model=args.model, tokens=args.tokens, commit=code_version(), torch=torch.__version__,
            device=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(),
            command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d"), rows=rows), indent=2))


if __name__ == "__main__":
    main()
