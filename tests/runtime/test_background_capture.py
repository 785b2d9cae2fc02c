"""CUDA graphs captured in the engine's idle time (`kiln serve --background-graphs`), with a
fake capture on the CPU: the runner captures what start-up left, smallest decode batch
first, one bucket a call, skipping what a step captured meanwhile; the engine loop does that
work only while no request runs, serves a request that arrives in between, and blocks for
commands again once it is done. The real capture is checked on a GPU
(tests/serving/test_serving_cuda.py)."""
from __future__ import annotations

import pytest
import torch

import models
from kiln.runtime.engine import serve_commands
from kiln.runtime.model_runner import PagedModelRunner
from kiln.runtime.sequence import SamplingParams
from kiln.serving import ServingConfig, _capture_graphs, compile_serving, model_weights
from toy import toy_engine


@pytest.fixture(scope="module")
def runner_parts():
    model = models.tiny_llama()
    cg = compile_serving(model, block_size=16)
    return cg, model_weights(model, cg.graph), model.config.vocab_size


def fake_runner(runner_parts, monkeypatch) -> tuple[PagedModelRunner, list]:
    cg, weights, vocab = runner_parts
    runner = PagedModelRunner(cg.fn, cg.graph, weights, num_blocks=16, max_model_len=128,
                              vocab_size=vocab, cudagraphs=True, seq_buckets=(1, 2, 4, 8),
                              max_num_batched_tokens=32)
    captured = []

    def capture(bucket, buf):
        captured.append(bucket)
        runner._graphs[bucket] = ("graph", None, ())
        return runner._graphs[bucket]
    monkeypatch.setattr(runner, "_capture", capture)
    return runner, captured


def test_start_up_leaves_every_bucket_to_idle_time(runner_parts, monkeypatch):
    runner, captured = fake_runner(runner_parts, monkeypatch)
    _capture_graphs(runner, lambda name: pytest.fail(f"start-up captured: {name}"),
                    ServingConfig(background_graphs=True))
    assert captured == []
    runner._capture((4, 4), None)   # a decode step of 3 sequences met its bucket first
    while runner.capture_in_background():
        pass
    decode = [(1, 1), (2, 2), (8, 8)]
    assert captured[:4] == [(4, 4)] + decode, "decode buckets first, smallest first, (4, 4) once"
    assert set(captured[4:]) == set(runner.mixed_buckets()) and len(captured) == 4 + len(runner.mixed_buckets())
    assert not runner.capture_in_background()


def test_lazy_mixed_graphs_leave_them_to_first_use(runner_parts, monkeypatch):
    runner, captured = fake_runner(runner_parts, monkeypatch)
    _capture_graphs(runner, None, ServingConfig(background_graphs=True, lazy_mixed_graphs=True))
    while runner.capture_in_background():
        pass
    assert captured == [(1, 1), (2, 2), (4, 4), (8, 8)]


def test_the_engine_captures_only_while_idle_and_then_blocks():
    eng, _ = toy_engine()
    work = {"left": 3, "during_steps": 0}

    def capture_in_background():
        work["during_steps"] += eng.has_unfinished()
        work["left"] -= 1
        return work["left"] > 0
    eng.runner.capture_in_background = capture_in_background
    script = [None, ("add", ([5, 6, 7], SamplingParams(max_tokens=4, temperature=0), "r1"))]
    blocks, outputs = [], []

    def next_command(block: bool):
        blocks.append((block, work["left"]))
        return script.pop(0) if script else None

    serve_commands(eng, next_command, outputs.extend, lambda: len(blocks) > 40)
    assert work == {"left": 0, "during_steps": 0}
    assert any(o.finished for _, o in outputs if o.request_id == "r1")
    assert [left for block, left in blocks if block] and all(
        left == 0 for block, left in blocks if block), "blocked while work was left"


def test_a_failing_background_capture_stops_the_work_not_the_engine():
    eng, _ = toy_engine()
    calls = []

    def capture_in_background():
        calls.append(1)
        raise RuntimeError("capture failed")
    eng.runner.capture_in_background = capture_in_background
    script = [None, ("add", ([5, 6], SamplingParams(max_tokens=2, temperature=0), "r1"))]
    outputs, looks = [], []

    def next_command(block: bool):
        looks.append(block)
        return script.pop(0) if script else None
    serve_commands(eng, next_command, outputs.extend, lambda: len(looks) > 10)
    assert len(calls) == 1 and any(o.finished for _, o in outputs)


def test_the_flag_reaches_the_serving_config():
    from kiln.cli import _serving_config, build_parser
    for argv, want in ((["serve", "smollm2"], False), (["serve", "smollm2", "--background-graphs"], True)):
        assert _serving_config(build_parser().parse_args(argv)).background_graphs is want
