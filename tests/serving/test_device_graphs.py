"""Serving graphs on xpu and npu without the hardware: the PagedModelRunner captures and
replays its bucket graphs through the target's own capture calls (torch.xpu.XPUGraph,
torch.npu.NPUGraph), here served by a test-only CPU-backed device module
(tests/fake_graph_device.py: a capture records operator calls and runs none of them until
replayed, and a host read during capture fails, as on a device).

- the bucket rules: decode buckets in multiples of 1 + k with speculation where the target
  asks for it (npu), unchanged elsewhere (cuda and hip exactly as before);
- xpu: a tiny Qwen3's serving wrapper for xpu captures its decode buckets (not the prefill
  ones: the torch paged attention reads a prefill batch's layout on the host), and the
  replays give the logits and the greedy tokens of the same wrapper run eagerly;
- npu, in a process of its own (tests/serving/npu_graph_checks.py: naming the npu device
  without torch_npu changes torch for the whole process): the same over torch_npu's
  reference operators, with the fused attention's host lengths given to every replay
  (NPUGraph.update) and speculative verify steps padded to multiples of 1 + k.
"""
from __future__ import annotations

import os
import random
import re
import subprocess
import sys

import pytest
import torch

import models
from fake_graph_device import CaptureError, fake_device_module
from kiln.backends.targets import TARGETS, get_target
from kiln.runtime.batch import build_batch
from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.model_runner import (PagedModelRunner, decode_buckets, graph_settings,
                                       in_multiples)
from kiln.runtime.sequence import SamplingParams
from kiln.runtime.spec_decode import SpeculativeConfig
from kiln.serving import compile_serving, model_weights
from target_device_map import wrapper_on_cpu

BLOCK = 4


class Tok:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


# -- bucket rules --------------------------------------------------------------------------------
def test_decode_buckets_in_multiples_of_the_verify_group():
    assert in_multiples(decode_buckets(256), 4) == (4, 8, 16, 32) + tuple(range(64, 257, 32))
    three = in_multiples(decode_buckets(64), 3)
    assert three == (3, 6, 9, 18, 33, 66)
    assert in_multiples(decode_buckets(96), 1) == decode_buckets(96)


@pytest.mark.parametrize("name", list(TARGETS))
def test_graph_settings_per_target(name):
    target = get_target(name)
    spec = SpeculativeConfig.parse("ngram:3")
    plain, speculative = graph_settings(target), graph_settings(target, spec)
    assert plain["decode_rows_multiple"] == 1
    assert speculative["decode_rows_multiple"] == (4 if name == "npu" else 1)
    assert plain["capture_prefill"] == (name in ("cpu", "cuda", "hip"))
    api = plain["graph_api"]
    assert (api is None) == (name == "cpu")
    if api is not None:
        assert f"{api.module}.{api.graph_class}" == target.graph_capture
        assert api.host_arguments == ("kiln.backends.npu:graph_host_arguments" if name == "npu"
                                      else None)


# -- xpu -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def xpu_compiled():
    model = models.tiny_qwen3()
    return model, compile_serving(model, target="xpu", block_size=BLOCK)


def test_runner_rounds_decode_buckets_but_not_prefill_ones(xpu_compiled):
    model, cg = xpu_compiled
    runner = PagedModelRunner(cg.fn, cg.graph, model_weights(model, cg.graph), num_blocks=8,
                              max_model_len=32, vocab_size=model.config.vocab_size,
                              seq_buckets=decode_buckets(64), pad_batches=True,
                              decode_rows_multiple=5)
    assert runner.seq_buckets == (5, 10, 20, 35, 65)
    assert runner.mixed_seq_buckets == (1, 4, 16, 64)
    decode = build_batch([([3, 4, 5, 6], 3, 1, [i]) for i in range(7)], BLOCK)
    assert runner.bucket_of(decode) == (10, 10)


@pytest.fixture
def fake_xpu(monkeypatch):
    module = fake_device_module("XPUGraph")
    monkeypatch.setattr(torch, "xpu", module)
    return module


def xpu_runner(model, cg, graphs: bool, seq_buckets=(1, 2, 4, 8)):
    return PagedModelRunner(wrapper_on_cpu(cg.source, "xpu"), cg.graph, model_weights(model, cg.graph),
                            num_blocks=48, max_model_len=64, vocab_size=model.config.vocab_size,
                            cudagraphs=graphs, seq_buckets=seq_buckets,
                            **graph_settings(get_target("xpu")))


def rel_err(a, b):
    a, b = a.double(), b.double()
    err = ((a - b).norm() / b.norm()).item()
    assert err == err, "NaN"
    return err


def test_xpu_decode_buckets_replay_the_eager_logits(xpu_compiled, fake_xpu):
    model, cg = xpu_compiled
    graphs, eager = xpu_runner(model, cg, True), xpu_runner(model, cg, False)
    assert graphs.capture_decode_buckets() == 4 and graphs.capture_mixed_buckets() == 0
    assert set(graphs._graphs) == {(1, 1), (2, 2), (4, 4), (8, 8)}
    assert len(fake_xpu.captures) == 4
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (5, 9, 3)]
    tables = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(3)]
    errs = []
    with torch.no_grad():
        prefill = build_batch([(p, 0, len(p), t) for p, t in zip(prompts, tables)], BLOCK)
        assert graphs.bucket_of(prefill) is None   # prefill runs eagerly, unpadded, on xpu
        for runner in (graphs, eager):
            runner.execute(prefill)
        for step in range(3):
            batch = build_batch([(p, len(p) - 1, 1, t) for p, t in zip(prompts, tables)], BLOCK)
            assert graphs.bucket_of(batch) == (4, 4)
            got, want = graphs.execute(batch), eager.execute(batch)
            errs.append(rel_err(got, want))
            for p, row in zip(prompts, want):
                p.append(int(row.argmax()))
    assert max(errs) < 1e-5, errs
    assert graphs.replays == 3 and fake_xpu.captures[2].replays == 3   # (4, 4): the third


def test_xpu_greedy_tokens_under_graphs_are_the_eager_ones(xpu_compiled, fake_xpu):
    model, cg = xpu_compiled
    rng = random.Random()
    prompts = [[rng.randrange(3, 200) for _ in range(n)] for n in (6, 11, 4, 9, 7)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = []
    for graphs in (False, True):
        runner = xpu_runner(model, cg, graphs)
        outs.append([o.token_ids for o in LLMEngine(runner, Tok(), EngineConfig(max_num_seqs=8))
                     .generate(prompts, params)])
    assert outs[1] == outs[0]
    assert runner.replays > 0 and all(t == n for t, n in runner._graphs)


def test_the_fake_device_graph_holds_code_to_what_a_device_does():
    """A capture runs nothing (its outputs hold NaN until replayed), a replay computes from
    the inputs' current values, and a host read during capture fails."""
    module = fake_device_module("XPUGraph")
    x = torch.arange(4.0)
    with pytest.raises(CaptureError, match="tolist"):
        with module.graph(module.XPUGraph()):
            (x * 2).tolist()
    graph = module.XPUGraph()
    with module.graph(graph):
        y = x * 2
    assert torch.isnan(y).all()
    x.copy_(torch.tensor([1.0, 2.0, 3.0, 5.0]))
    graph.replay()
    assert y.tolist() == [2.0, 4.0, 6.0, 10.0] and len(module.captures) == 1


# -- npu -----------------------------------------------------------------------------------------
def test_acl_graphs_in_a_process_of_their_own(tmp_path):
    checks = os.path.join(os.path.dirname(os.path.abspath(__file__)), "npu_graph_checks.py")
    env = {**os.environ, "KILN_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", checks, "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist", "-x"], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(checks)), timeout=600)
    out = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, out
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) == 3 and "skipped" not in proc.stdout, out


def test_verify_steps_replay_batch_invariant_graphs_of_their_own(xpu_compiled, fake_xpu):
    """Speculation's verify steps (batch.invariant) run in graphs captured under
    batch_invariant(), beside the plain ones of the same bucket: captured at start-up for the
    buckets of at most `invariant_up_to` rows, replayed for a marked batch and never for an
    unmarked one; the logits agree with the plain graph's (on the CPU the mode changes no
    kernel)."""
    from kiln.backends.batch_invariance import enabled
    model, cg = xpu_compiled
    runner = xpu_runner(model, cg, True)
    modes, core = [], runner._core
    runner._core = lambda *a: modes.append(enabled()) or core(*a)
    assert runner.capture_decode_buckets(invariant_up_to=2) == 4 + 2
    assert set(runner._graphs) == {(1, 1), (2, 2), (4, 4), (8, 8), (1, 1, "invariant"),
                                   (2, 2, "invariant")}
    assert modes.count(True) == 2 * 2   # (a warm-up and a capture each)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (6,)).tolist()
    with torch.no_grad():
        runner.execute(build_batch([(prompt, 0, 6, [0, 1, 2])], BLOCK))
        rows = [(prompt + [7], 6, 1, [0, 1, 2]), (prompt + [7, 9], 7, 1, [0, 1, 2])]
        plain = runner.execute(build_batch(rows, BLOCK))
        verify = build_batch(rows, BLOCK)
        verify.invariant = True
        invariant = runner.execute(verify)
    plain_graph, invariant_graph = runner._graphs[(2, 2)][0], runner._graphs[(2, 2, "invariant")][0]
    assert plain_graph.replays == 1 and invariant_graph.replays == 1
    assert rel_err(invariant, plain) < 1e-6 and not enabled()
