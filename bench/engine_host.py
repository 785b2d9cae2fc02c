"""Host cost of the serving engine per step, without a model: what a GPU's decode step
waits for when the engine is the limit.

    python bench/engine_host.py --seqs 1,16,64,256 --out bench/results/engine_host.json

A runner that returns a ready logits tensor (no compute) stands in for the model, and the
sampler is replaced by a draw of random token ids, so each step measures only the engine's
own work: scheduling and the flat batch, the runner call, output processing (append, stop
checks, detokenization with the real SmolLM2 tokenizer: its tokens are real text). N
requests of a 128-token prompt decode for `--steps` steps after their prefill; the table
gives the mean host time per step of each phase (the engine's kiln_step_phase_seconds) and
per sequence. No HTTP: `kiln bench serve --profile` measures the server as a whole.
"""
from __future__ import annotations

import argparse
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
from kiln.runtime.sequence import SamplingParams
from provenance import code_version

PROMPT_TOKENS = 128


class NoModel:
    """A ModelRunner whose step costs nothing: a slice of a preallocated logits tensor."""
    block_size = 16

    def __init__(self, vocab_size: int, max_seqs: int, max_len: int):
        self.vocab_size, self.max_model_len = vocab_size, max_len
        self.num_blocks = max_seqs * -(-max_len // self.block_size)
        self.logits = torch.zeros(max_seqs, 8)

    def execute(self, batch):
        return self.logits[:batch.num_seqs]


def random_tokens(logits, params, generators):
    return torch.randint(1000, 40000, (logits.shape[0],))


def measure(tok, seqs: int, steps: int) -> dict:
    runner = NoModel(len(tok), seqs, PROMPT_TOKENS + steps + 8)
    eng = LLMEngine(runner, tok, EngineConfig(max_num_seqs=seqs, max_waiting=seqs,
                                              max_num_batched_tokens=seqs * PROMPT_TOKENS))
    rng = random.Random(0)
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for _ in range(seqs):
        eng.add_request([rng.randrange(1000, 10000) for _ in range(PROMPT_TOKENS)], params)
    for _ in range(3):              # the prefill, then two decode steps
        eng.step()
    value = eng.metrics.registry.get_sample_value
    before = {p: value("kiln_step_phase_seconds_sum", {"phase": p}) for p in STEP_PHASES}
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    wall = (time.perf_counter() - t0) / steps
    phase = {p: (value("kiln_step_phase_seconds_sum", {"phase": p}) - before[p]) / steps
             for p in STEP_PHASES if p != "deliver"}
    return {"seqs": seqs, "steps": steps, "step_us": wall * 1e6,
            "per_seq_us": wall * 1e6 / seqs, "phase_us": {k: v * 1e6 for k, v in phase.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="1,16,64,256", help="batch sizes (comma-separated)")
    ap.add_argument("--steps", type=int, default=100, help="decode steps measured per size")
    ap.add_argument("--out")
    args = ap.parse_args()
    _, tok = hf.load("smollm2")
    engine_module.sample_on_device = random_tokens   # no sampling cost: the engine alone
    rows = [measure(tok, int(n), args.steps) for n in args.seqs.split(",")]
    print(f"{'seqs':>5} {'step us':>9} {'us/seq':>7}  " + "  ".join(f"{p:>9}" for p in rows[0]["phase_us"]))
    for r in rows:
        print(f"{r['seqs']:>5} {r['step_us']:>9.0f} {r['per_seq_us']:>7.2f}  "
              + "  ".join(f"{v:>9.0f}" for v in r["phase_us"].values()))
    result = {"bench": "engine_host", "code_version": code_version(),
              "command": "python bench/engine_host.py --seqs " + args.seqs + f" --steps {args.steps}",
              "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
              "torch": torch.__version__, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
