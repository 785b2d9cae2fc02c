"""`kiln serve` without a model: the real HTTP server, engine and SmolLM2 tokenizer over a
runner that sleeps `--step-ms` (the device time of a step, GIL released) and returns
ready logits, with sampling replaced by random token ids. What `kiln bench serve` then
measures is the serving stack's own limit on one machine.

    python bench/serve_nomodel.py --port 18500 --step-ms 0.5 --max-num-seqs 256 [--engine-thread] &
    kiln bench serve --url http://127.0.0.1:18500 --concurrency 64 --num-requests 192 \
        --input-len 128 --output-len 128 --warmup --profile
"""
from __future__ import annotations

import argparse
import time

import kiln.runtime.engine as engine_module
from engine_host import NoModel, random_tokens
from kiln.frontends import hf
from kiln.runtime.engine import AsyncEngine, EngineConfig, LLMEngine
from kiln.runtime.engine_process import EngineProcess
from kiln.runtime.server import create_app, serve


class SleepingModel(NoModel):
    def __init__(self, vocab_size: int, max_seqs: int, max_len: int, step_s: float):
        super().__init__(vocab_size, max_seqs, max_len)
        self.step_s = step_s

    def execute(self, batch):
        time.sleep(self.step_s)
        return super().execute(batch)


def nomodel_engine(step_ms: float, max_num_seqs: int, max_num_batched_tokens: int):
    """The engine (and, as an engine process's factory, its info)."""
    _, tok = hf.load("smollm2")
    engine_module.sample_on_device = random_tokens
    runner = SleepingModel(len(tok), max_num_seqs, 2048, step_ms / 1e3)
    return LLMEngine(runner, tok, EngineConfig(max_num_seqs=max_num_seqs, max_waiting=1024,
                                               max_num_batched_tokens=max_num_batched_tokens)), {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=18500)
    ap.add_argument("--step-ms", type=float, default=0.5, help="device time a step stands for")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--engine-thread", action="store_true",
                    help="the engine in a thread of the server (default: its own process, as kiln serve)")
    args = ap.parse_args()
    spec = (args.step_ms, args.max_num_seqs, args.max_num_batched_tokens)
    client = AsyncEngine(nomodel_engine(*spec)[0]) if args.engine_thread else EngineProcess(nomodel_engine, *spec)
    serve(create_app(client, "nomodel"), port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
