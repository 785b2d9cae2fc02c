"""The xpu target without an Intel GPU: a tiny Llama's serving graph compiled for xpu runs
its fused ops as torch ops (no Triton kernel: see the targets table), and its wrapper,
with the xpu device mapped to the CPU by the test-only device map (tests/target_device_map.py),
gives HF eager's logits over a paged KV cache (a serving graph whose tensors all come in as
inputs, like this one, names no device, so there the map changes nothing; the tensors the
runner passes are CPU ones). The graph-capture calls the xpu target
names exist in this torch (torch.xpu.XPUGraph, graph, graph_pool_handle, synchronize);
no capture runs here."""
from __future__ import annotations

import inspect

import pytest
import torch

import models
from kiln.backends.cudagraphs import GraphAPI
from kiln.backends.targets import get_target
from kiln.runtime.batch import build_batch
from kiln.runtime.model_runner import PagedModelRunner
from kiln.serving import compile_serving, model_weights
from target_device_map import wrapper_on_cpu

BLOCK = 4


@pytest.fixture(scope="module")
def compiled():
    model = models.tiny_qwen3()
    return model, compile_serving(model, target="xpu", block_size=BLOCK)


def test_xpu_graph_api_is_torchs():
    api = GraphAPI.of(get_target("xpu"))
    assert (api.module, api.graph_class) == ("torch.xpu", "XPUGraph")
    mod = api.device_module()
    assert inspect.isclass(mod.XPUGraph)
    assert {"pool"} <= set(inspect.signature(mod.graph.__init__).parameters)
    assert callable(mod.graph_pool_handle) and callable(mod.synchronize)
    assert api.available() == torch.xpu.is_available()


def test_xpu_wrapper_on_cpu_matches_eager(compiled):
    model, cg = compiled
    assert "import triton" not in cg.source
    assert "from kiln.backends.paged_attention import paged_attention" in cg.source
    forward = wrapper_on_cpu(cg.source, "xpu")
    runner = PagedModelRunner(forward, cg.graph, model_weights(model, cg.graph), num_blocks=16,
                              max_model_len=32, vocab_size=model.config.vocab_size)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (5, 8, 2)]
    tables = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    errs = []
    with torch.no_grad():
        for step in range(2):
            if step == 0:
                batch = [(p, 0, len(p), t) for p, t in zip(prompts, tables)]
            else:
                batch = [(p, len(p) - 1, 1, t) for p, t in zip(prompts, tables)]
            logits = runner.execute(build_batch(batch, BLOCK))
            for i, p in enumerate(prompts):
                want = model(torch.tensor([p])).logits[0, -1]
                errs.append(((logits[i].double() - want.double()).norm() / want.double().norm()).item())
                if step == 0:
                    p.append(int(want.argmax()))
    assert max(errs) < 1e-5, errs
