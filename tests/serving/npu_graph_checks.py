"""ACL graphs for the npu target without an NPU. Run by tests/serving/test_device_graphs.py
in a pytest process of its own (this file's name keeps the suite from collecting it):
compiling for npu without torch_npu names torch's privateuse1 device "npu" for the whole
process, and this process also puts a test-only device module at `torch.npu`
(tests/fake_graph_device.py, with torch_npu 2.14's graph update) and torch_npu's
operators as CPU references (tests/npu_reference_ops.py).

A tiny Llama's serving graph compiled for npu runs through PagedModelRunner with the npu
target's graph settings: its decode buckets are captured as NPUGraphs whose fused
attention calls take their sequence lengths as host arguments, given before every replay
(NPUGraph.update); replays give the eager logits (and, without the update, do not);
prefill is never captured; with speculative decoding (ngram:3) the decode buckets are
multiples of 1 + k = 4 and greedy tokens are those of plain eager decoding.
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

import models
import npu_reference_ops
from fake_graph_device import NPU_HOST_ARGUMENT_OPS, fake_device_module
from kiln.backends.targets import get_target
from kiln.runtime.batch import build_batch
from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.model_runner import PagedModelRunner, graph_settings
from kiln.runtime.sequence import SamplingParams
from kiln.runtime.spec_decode import SpeculativeConfig
from kiln.serving import compile_serving, model_weights
from target_device_map import wrapper_on_cpu

BLOCK = 4
SPEC = SpeculativeConfig.parse("ngram:3")


class Tok:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def compiled():
    model = models.tiny_llama()
    cg = compile_serving(model, target="npu", block_size=BLOCK)
    npu_reference_ops.register()
    return model, cg


@pytest.fixture(scope="module")
def fake_npu():
    torch.npu = fake_device_module("NPUGraph", NPU_HOST_ARGUMENT_OPS)
    return torch.npu


def runner(model, cg, graphs: bool, speculative=None, **settings):
    return PagedModelRunner(wrapper_on_cpu(cg.source, "npu"), cg.graph, model_weights(model, cg.graph),
                            num_blocks=64, max_model_len=64, vocab_size=model.config.vocab_size,
                            cudagraphs=graphs, seq_buckets=(1, 2, 4, 8, 16),
                            **{**graph_settings(get_target("npu"), speculative), **settings})


def rel_err(a, b):
    a, b = a.double(), b.double()
    err = ((a - b).norm() / b.norm()).item()
    assert err == err, "NaN"
    return err


def decode_steps(graphs, eager, model, steps=3):
    """Prefill three prompts on both runners, then decode `steps` steps on each; the
    per-step relative error of the graphs' logits against the eager ones."""
    prompts = [torch.randint(0, model.config.vocab_size, (n,)).tolist() for n in (5, 9, 3)]
    tables = [list(range(4 * i, 4 * i + 4)) for i in range(3)]
    errs = []
    with torch.no_grad():
        prefill = build_batch([(p, 0, len(p), t) for p, t in zip(prompts, tables)], BLOCK)
        assert graphs.bucket_of(prefill) is None   # prefill runs eagerly on npu
        graphs.execute(prefill)
        eager.execute(prefill)
        for _ in range(steps):
            batch = build_batch([(p, len(p) - 1, 1, t) for p, t in zip(prompts, tables)], BLOCK)
            got, want = graphs.execute(batch), eager.execute(batch)
            errs.append(rel_err(got, want))
            for p, row in zip(prompts, want):
                p.append(int(row.argmax()))
    return errs, [len(p) for p in prompts]


def test_decode_buckets_replay_with_each_steps_lengths(compiled, fake_npu):
    model, cg = compiled
    graphs, eager = runner(model, cg, True), runner(model, cg, False)
    assert graphs.capture_decode_buckets() == 5 and graphs.capture_mixed_buckets() == 0
    assert set(graphs._graphs) == {(n, n) for n in (1, 2, 4, 8, 16)}
    layers = model.config.num_hidden_layers
    bucket_4 = fake_npu.captures[2]
    # every layer's fused attention recorded with its lengths as a host argument
    assert [c.func.__name__ for c in bucket_4._host_argument_calls] == \
        ["npu_fused_infer_attention_score.default"] * layers
    errs, lengths = decode_steps(graphs, eager, model)
    assert max(errs) < 1e-5, errs
    assert graphs.replays == 3 and bucket_4.replays == 3
    # the last replay's lengths, for every layer: the three sequences' contexts (each has
    # one token more since), then the scratch sequence's 1
    (last,) = {tuple(u["actual_seq_lengths_kv"]) for u in bucket_4.updates[-1]}
    assert list(last) == [n - 1 for n in lengths] + [1]


def test_without_the_lengths_update_replays_are_wrong(compiled, fake_npu):
    """The update is what makes the replays right: a graph captured without it keeps the
    capture's lengths (the block table's width) and attends to keys past each context."""
    model, cg = compiled
    api = graph_settings(get_target("npu"))["graph_api"]
    graphs = runner(model, cg, True, graph_api=dataclasses.replace(api, host_arguments=None))
    errs, _ = decode_steps(graphs, runner(model, cg, False), model, steps=1)
    assert graphs.replays == 1 and errs[0] > 1e-3, errs


def test_speculative_verify_steps_run_in_multiples_of_1_plus_k(compiled, fake_npu):
    model, cg = compiled
    graphs = runner(model, cg, True, SPEC)
    assert graphs.seq_buckets == (4, 8, 16)
    used = []
    bucket_of = graphs.bucket_of

    def recording_bucket_of(batch):
        bucket = bucket_of(batch)
        used.append((batch.is_decode, batch.num_seqs, bucket))
        return bucket
    graphs.bucket_of = recording_bucket_of
    rng = random.Random()
    loop = [rng.randrange(3, 200) for _ in range(5)]
    prompts = [loop * 4, [rng.randrange(3, 200) for _ in range(13)], loop * 2 + [7]]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = LLMEngine(runner(model, cg, False), Tok(), EngineConfig(max_num_seqs=8)).generate(prompts, params)
    engine = LLMEngine(graphs, Tok(), EngineConfig(max_num_seqs=8, speculative=SPEC))
    assert [o.token_ids for o in engine.generate(prompts, params)] == [o.token_ids for o in plain]
    assert engine.spec.stats.verify_steps > 0 and graphs.replays > 0
    decode = [(rows, bucket) for is_decode, rows, bucket in used if is_decode]
    assert any(rows > 3 for rows, _ in decode), decode   # some steps verified drafts
    assert all(bucket is not None and bucket[0] % 4 == 0 for _, bucket in decode), decode
    assert all(bucket is None for is_decode, _, bucket in used if not is_decode)
