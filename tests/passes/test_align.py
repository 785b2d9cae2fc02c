"""prepare.align: on the cpu target, the norm weights of a model whose parameters sit at
unaligned addresses (as a mapped safetensors file leaves them) reach the TVM kernels
through aligned copies made once by weight preparation, and a weight written in place is
copied again."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

import kiln                                              # noqa: E402
from kiln.backends import cpu_kernels                    # noqa: E402
from kiln.backends.tvm import counts                     # noqa: E402
from models import tiny_llama                            # noqa: E402


def unaligned_vectors(model) -> list[str]:
    """Moves every 1-D parameter to a view 4 bytes past a 64-byte boundary (what
    safetensors' mapped file gives); returns their names."""
    names = []
    for name, p in model.named_parameters():
        if p.dim() == 1:
            buf = torch.empty(p.numel() + 16, dtype=p.dtype)
            view = buf[1:1 + p.numel()]
            view.copy_(p.data)
            p.data = view
            assert p.data_ptr() % cpu_kernels.TVM_ALIGNMENT
            names.append(name)
    return names


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def tvm_on(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "kiln-cache"))
    monkeypatch.delenv("KILN_TVM", raising=False)
    counts(reset=True)


def test_unaligned_norm_weights_run_on_tvm_through_prepared_copies(tvm_on):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    vectors = unaligned_vectors(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    graphs = []
    torch._dynamo.reset()
    fn = torch.compile(model, backend="kiln", options={"target": "cpu", "observer": graphs.append})
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        got = fn(ids, use_cache=False).logits
    assert rel_err(got, want) < 1e-5
    c = counts()
    norms = c.get("tvm:rms_norm", 0) + c.get("tvm:fused_add_rms_norm", 0)
    assert norms == len(vectors)                      # 2 per layer and the final norm
    assert not [k for k in c if k.startswith("torch:") and "norm" in k], c
    prepare = graphs[0].prepare
    assert prepare is not None
    assert sum(n.op == "aten.clone" for n in prepare.nodes) == len(vectors)
    assert "prepare.align: replaced " + str(len(vectors)) in graphs[0].stats

    # A weight written in place is copied again: the next call sees the new values.
    norm = model.model.norm.weight
    with torch.no_grad():
        norm.mul_(2.0)
        assert norm.data_ptr() % cpu_kernels.TVM_ALIGNMENT   # still the unaligned view
        want = model(ids, use_cache=False).logits
        got = fn(ids, use_cache=False).logits
    assert rel_err(got, want) < 1e-5


GRAPH = """func @f(%x: f32[2, 8], weight %w: f32[8]) -> f32[2, 8] {
  %0 = kiln.rms_norm(%x, %w, eps=1e-06) : f32[2, 8]
  return %0
}
"""


@pytest.mark.parametrize("target, clones", [("cpu", 1), ("cuda", 0)])
def test_only_targets_with_an_alignment_copy(target, clones):
    from kiln.ir import parse
    compiled = kiln.compile(parse(GRAPH), target=target, cudagraphs=False)
    prepared = compiled.prepare.nodes if compiled.prepare is not None else []
    assert sum(n.op == "aten.clone" for n in prepared) == clones
