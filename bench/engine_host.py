"""Host cost of the serving engine per step, without a model: what a GPU's decode step
waits for when the engine is the limit.

    python bench/engine_host.py --seqs 1,16,64,256 --out bench/results/engine_host.json

A runner that computes nothing stands in for the model: like the GPU runner it copies each
batch into the static step buffers of its bucket (`StepBuffers.fill`, plain CPU tensors
here) and applies the pending inputs of async scheduling, then returns a ready logits
tensor. The sampler is replaced by a draw of random token ids, so each step measures only
the engine's own work: scheduling and the flat batch, the runner call, output processing
(append, stop checks, detokenization with the real SmolLM2 tokenizer: its tokens are real
text). Two workloads, each with the synchronous and the async engine (`--modes`):
- decode: N requests of a 128-token prompt decode for `--steps` steps after their prefill;
- steady: N streams whose requests (128 in / 128 out +-50%) are replaced as they finish,
  so steps mix prefill chunks (a 2048-token budget) with decodes; `--steps` steps are
  measured after STEADY_WARMUP.
The table gives the mean host time per step of each phase (the engine's
kiln_step_phase_seconds) and per sequence. No HTTP: `kiln bench serve --profile` measures
the server as a whole.

`--device cuda` keeps the step buffers (pinned host memory, asynchronous copies), the
logits and the sampled ids on the GPU, with the engine's CUDA events, as under `kiln
serve`. `--tokenizer words:VOCAB` detokenizes with bench/make_shape_model.py's word-level
tokenizer, the one of the random-weight shape models the GPU serving benchmarks run (no
SmolLM2 weights needed).
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import time
from pathlib import Path

import torch

import kiln.runtime.engine as engine_module
from kiln.frontends import hf
from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.metrics import STEP_PHASES
from kiln.runtime.model_runner import (PagedModelRunner, decode_buckets, mixed_seq_buckets,
                                       token_buckets)
from kiln.runtime.sequence import SamplingParams
from provenance import code_version

PROMPT_TOKENS = 128
STEADY_BATCHED_TOKENS = 2048   # what bench/step_profile.py and kiln serve run with
STEADY_WARMUP = 200            # steps before a steady run is measured


class NoModel:
    """A ModelRunner whose model costs nothing: PagedModelRunner's own host path (bucket
    choice, step buffers, pending inputs), over a "model" that returns a preallocated
    logits tensor."""
    block_size = 16
    accepts_pending_inputs = True
    pad_batches, cudagraphs = True, False
    execute = PagedModelRunner.execute
    bucket_of = PagedModelRunner.bucket_of
    buffers = PagedModelRunner.buffers
    _run_bucket = PagedModelRunner._run_bucket
    _args = PagedModelRunner._args

    def __init__(self, vocab_size: int, max_seqs: int, max_len: int, max_num_batched_tokens: int,
                 device: str = "cpu"):
        self.vocab_size, self.max_model_len = vocab_size, max_len
        self.max_blocks_per_seq = -(-max_len // self.block_size)
        self.num_blocks = max_seqs * self.max_blocks_per_seq
        self.scratch_block = self.num_blocks
        self.device = torch.device(device)
        self.seq_buckets = decode_buckets(max_seqs)
        self.mixed_seq_buckets = mixed_seq_buckets(self.seq_buckets)
        self.token_buckets = token_buckets(max_num_batched_tokens, self.seq_buckets[-1])
        self._buffers = {}
        self._binding = []   # the model takes no inputs
        self.steps = 0
        logits = torch.zeros(max_seqs, 8, device=device)
        self.fn = lambda: (logits,)


def random_tokens(logits, params, generators):
    return torch.randint(1000, 40000, (logits.shape[0],), device=logits.device)


def measure(tok, seqs: int, steps: int, mode: str, workload: str, device: str = "cpu") -> dict:
    steady = workload == "steady"
    budget = STEADY_BATCHED_TOKENS if steady else seqs * PROMPT_TOKENS
    max_len = 3 * PROMPT_TOKENS if steady else PROMPT_TOKENS + steps + 8
    runner = NoModel(len(tok), seqs, max_len, budget, device)
    eng = LLMEngine(runner, tok, EngineConfig(max_num_seqs=seqs, max_waiting=seqs,
                                              max_num_batched_tokens=budget, async_scheduling=mode == "async"))
    rng = random.Random(0)
    torch.manual_seed(0)

    def add(prompt_len: int, max_tokens: int) -> None:
        eng.add_request([rng.randrange(1000, 10000) for _ in range(prompt_len)],
                        SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))

    def top_up() -> None:
        while steady and len(eng.seqs) < seqs:
            add(rng.randint(PROMPT_TOKENS // 2, PROMPT_TOKENS * 3 // 2),
                rng.randint(PROMPT_TOKENS // 2, PROMPT_TOKENS * 3 // 2))

    if not steady:
        for _ in range(seqs):
            add(PROMPT_TOKENS, steps + 8)
    for _ in range(STEADY_WARMUP if steady else 3):   # decode: the prefill, then two decode steps
        top_up()
        eng.step()
    value = eng.metrics.registry.get_sample_value
    before = {p: value("kiln_step_phase_seconds_sum", {"phase": p}) for p in STEP_PHASES}
    seqs_before, tokens_before = value("kiln_step_sequences_sum"), value("kiln_step_tokens_sum")
    t0 = time.perf_counter()
    for _ in range(steps):
        top_up()
        eng.step()
    wall = (time.perf_counter() - t0) / steps
    phase = {p: (value("kiln_step_phase_seconds_sum", {"phase": p}) - before[p]) / steps
             for p in STEP_PHASES if p != "deliver"}
    return {"device": device, "mode": mode, "workload": workload, "seqs": seqs, "steps": steps, "step_us": wall * 1e6,
            "per_seq_us": wall * 1e6 / seqs, "phase_us": {k: v * 1e6 for k, v in phase.items()},
            "batch_seqs": (value("kiln_step_sequences_sum") - seqs_before) / steps,
            "batch_tokens": (value("kiln_step_tokens_sum") - tokens_before) / steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="1,16,64,256", help="batch sizes (comma-separated)")
    ap.add_argument("--steps", type=int, default=100, help="steps measured per run")
    ap.add_argument("--modes", default="sync,async", help="engine modes: sync, async")
    ap.add_argument("--workloads", default="decode,steady", help="decode, steady")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--tokenizer", default="smollm2", help="smollm2, or words:VOCAB")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.tokenizer.startswith("words:"):
        from make_shape_model import word_tokenizer
        tok = word_tokenizer(int(args.tokenizer.split(":")[1]))
    else:
        _, tok = hf.load(args.tokenizer)
    engine_module.sample_on_device = random_tokens   # no sampling cost: the engine alone
    gc.collect()
    gc.freeze()   # as kiln serve's engine process does: no full collection scans start-up's objects
    rows = [measure(tok, int(n), args.steps, mode, workload, args.device)
            for workload in args.workloads.split(",") for mode in args.modes.split(",")
            for n in args.seqs.split(",")]
    phases = list(rows[0]["phase_us"])
    print(f"{'workload':>8} {'mode':>5} {'seqs':>5} {'batch':>11} {'step us':>8} {'us/seq':>7}  "
          + "  ".join(f"{p:>8}" for p in phases))
    for r in rows:
        shape = f"{r['batch_seqs']:.0f}/{r['batch_tokens']:.0f}"
        print(f"{r['workload']:>8} {r['mode']:>5} {r['seqs']:>5} {shape:>11} {r['step_us']:>8.0f} "
              f"{r['per_seq_us']:>7.2f}  " + "  ".join(f"{v:>8.0f}" for v in r["phase_us"].values()))
    result = {"bench": "engine_host", "code_version": code_version(),
              "command": f"python bench/engine_host.py --seqs {args.seqs} --steps {args.steps} "
                         f"--modes {args.modes} --workloads {args.workloads} --device {args.device} "
                         f"--tokenizer {args.tokenizer}",
              "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    gc.unfreeze()   # (frozen objects outlive the interpreter's exit: nanobind reports them as leaks)


if __name__ == "__main__":
    main()
