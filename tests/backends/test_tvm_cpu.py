"""The CPU target's TVM kernels (kiln.backends.tvm): numerics against the ops' reference
implementations, the on-disk module cache, and a tiny Llama's decode running on them.
Tiny shapes, and the module cache shared by the tests of one run: TVM's LLVM build is
~0.1-0.4 s a kernel."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from kiln.backends import cpu_kernels                    # noqa: E402
from kiln.backends.tvm import build as tvm_build         # noqa: E402
from kiln.backends.tvm import counts                     # noqa: E402
from kiln.ir import kiln_ref                             # noqa: E402

ALL_OPS = frozenset({"rms_norm", "fused_add_rms_norm", "rope", "silu_mul", "weight_int4_mm",
                     "weight_int8_grouped_mm"})

QUANTISED_GEMVS = frozenset({"weight_int4_mm", "weight_int8_grouped_mm"})


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def tvm_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kiln-cache")


@pytest.fixture
def every_op_on_tvm(monkeypatch, tvm_cache):
    """Every op TVM has a kernel for runs it, the ones torch won against included."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tvm_cache))
    monkeypatch.delenv("KILN_TVM", raising=False)
    monkeypatch.setattr(cpu_kernels, "TVM_OPS", ALL_OPS)
    counts(reset=True)


def _ran_on_tvm(op):
    c = counts()
    assert c.get(f"tvm:{op}", 0) >= 1 and not any(k.startswith(f"torch:{op}:") for k in c), c


@pytest.mark.parametrize("shape", [(1, 1, 96), (2, 3, 96)])
def test_norms_match_the_reference(every_op_on_tvm, shape):
    x, r, w = torch.randn(shape), torch.randn(shape), torch.randn(96)
    assert rel_err(cpu_kernels.rms_norm(x, w, 1e-6), kiln_ref.rms_norm(x, w, 1e-6)) < 1e-5
    got, want = cpu_kernels.fused_add_rms_norm(x, r, w, 1e-5), kiln_ref.fused_add_rms_norm(x, r, w, 1e-5)
    assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[1], want[1]) < 1e-5
    _ran_on_tvm("rms_norm")
    _ran_on_tvm("fused_add_rms_norm")


def test_rope_and_silu_mul_match_the_reference(every_op_on_tvm):
    # q as a decode step has it: a permuted view of the projection, [B, H, 1, D]
    q = torch.randn(2, 1, 4, 32).permute(0, 2, 1, 3)
    cos, sin = torch.randn(2, 1, 32), torch.randn(2, 1, 32)
    assert rel_err(cpu_kernels.rope(q, cos, sin), kiln_ref.rope(q, cos, sin)) < 1e-5
    gate, up = torch.randn(1, 3, 160), torch.randn(1, 3, 160)
    assert rel_err(cpu_kernels.silu_mul(gate, up), kiln_ref.silu_mul(gate, up)) < 1e-5
    _ran_on_tvm("rope")
    _ran_on_tvm("silu_mul")


@pytest.mark.parametrize("scale_dtype, group", [(torch.bfloat16, 32), (torch.float32, 64)])
def test_int4_gemv_matches_its_dequantised_reference(every_op_on_tvm, scale_dtype, group):
    """Against kiln_ref.weight_int4_mm: x @ int4_dequantize(w_q, w_sz).T in float32, the
    same scales (bf16 ones too) the kernel reads."""
    w_q, w_sz = cpu_kernels.quant_int4(torch.randn(128, 192), group, scale_dtype)
    x, bias = torch.randn(1, 192), torch.randn(128)
    got = cpu_kernels.weight_int4_mm(x, w_q, w_sz, bias, group)
    assert rel_err(got, kiln_ref.weight_int4_mm(x, w_q, w_sz, bias, group)) < 1e-5
    _ran_on_tvm("weight_int4_mm")


@pytest.mark.parametrize("group, rows", [(32, 1), (64, 3), (128, cpu_kernels.INT8_GROUPED_TVM_ROWS)])
def test_grouped_int8_gemv_matches_its_dequantised_reference(every_op_on_tvm, group, rows):
    """Against kiln_ref.weight_int8_grouped_mm: x @ int8_grouped_dequantize(w_q, w_sz).T in
    float32, at every row count the GEMV takes (a decode step, a speculative verify)."""
    w_q, w_sz = kiln_ref.quant_int8_grouped(torch.randn(128, 256), group)
    x, bias = torch.randn(rows, 256), torch.randn(128)
    got = cpu_kernels.weight_int8_grouped_mm(x, w_q, w_sz, bias)
    assert rel_err(got, kiln_ref.weight_int8_grouped_mm(x, w_q, w_sz, bias)) < 1e-6
    _ran_on_tvm("weight_int8_grouped_mm")


def test_grouped_int8_past_the_gemv_rows_runs_torch_exactly(every_op_on_tvm):
    """A prefill's rows are compute-bound: torch's GEMM over the dequantised weight, counted
    as such, equal to the reference."""
    w_q, w_sz = kiln_ref.quant_int8_grouped(torch.randn(64, 96), 32)
    x = torch.randn(cpu_kernels.INT8_GROUPED_TVM_ROWS + 1, 96)
    got = cpu_kernels.weight_int8_grouped_mm(x, w_q, w_sz, None)
    assert torch.equal(got, kiln_ref.weight_int8_grouped_mm(x, w_q, w_sz, None))
    assert counts() == {"torch:weight_int8_grouped_mm:rows": 1}


def test_other_operands_run_torch_and_are_counted(every_op_on_tvm):
    x = torch.randn(2, 96, dtype=torch.bfloat16)
    w = torch.randn(96, dtype=torch.bfloat16)
    assert torch.equal(cpu_kernels.rms_norm(x, w, 1e-6), kiln_ref.rms_norm(x, w, 1e-6))
    assert counts() == {"torch:rms_norm:operands": 1}


def test_a_weight_off_the_64_byte_boundary_runs_torch(every_op_on_tvm):
    """TVM's code loads its buffers with aligned vector moves: a weight that starts 16 bytes
    into its storage (as a tensor mmapped from a safetensors file can) crashed the process
    with SIGSEGV before kiln checked the alignment."""
    storage = torch.randn(4 + 96)
    w = storage[4:]
    assert w.data_ptr() % 64 != 0
    x = torch.randn(2, 3, 96)
    assert rel_err(cpu_kernels.rms_norm(x, w, 1e-6), kiln_ref.rms_norm(x, w, 1e-6)) < 1e-5
    assert counts() == {"torch:rms_norm:operands": 1}


def test_module_cache_hit_on_a_second_build(tmp_path, monkeypatch):
    """A fresh process (memory forgotten) loads the module from disk instead of building
    it; a file that does not load is rebuilt, not trusted."""
    from kiln.backends.tvm import kernels
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    params = dict(rank=2, d=48, eps=1e-6)
    counts(reset=True)
    tvm_build.get("rms_norm", params, kernels.rms_norm)
    tvm_build.clear_memory()
    fn = tvm_build.get("rms_norm", params, kernels.rms_norm)
    assert counts() == {"build": 1, "disk_hit": 1}
    x, w, out = torch.randn(3, 48), torch.randn(48), torch.empty(3, 48)
    fn(x, w, out)
    assert rel_err(out, kiln_ref.rms_norm(x, w, 1e-6)) < 1e-5
    # A truncated module where another kernel's would be (not one this process has loaded:
    # the dynamic loader would hand back the loaded one by its path).
    other = dict(rank=2, d=40, eps=1e-6)
    corrupt = tmp_path / "tvm" / f"{tvm_build.key('rms_norm', other)}.so"
    corrupt.write_bytes(b"not a shared object")
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        tvm_build.get("rms_norm", other, kernels.rms_norm)
    assert counts() == {"build": 2, "disk_hit": 1, "rebuilt": 1}
    assert len(list((tmp_path / "tvm").iterdir())) == 2     # no temp files left behind
    tvm_build.clear_memory()


def test_tiny_llama_decodes_on_tvm_kernels(tvm_cache, monkeypatch):
    """A tiny Llama compiled for the cpu target, decoded through a StaticCache: float32
    logits within 1e-5 of eager with the ops TVM_OPS chooses on TVM;
    with int4 weights and every TVM kernel chosen, the decode GEMVs on TVM too, within
    bf16's bound of the torch kernels (KILN_TVM=0), whose bf16 activations are the less
    exact of the two. Fails if any chosen op silently ran torch code."""
    from models import eager_greedy, tiny_llama
    monkeypatch.setenv("KILN_CACHE_DIR", str(tvm_cache))
    monkeypatch.delenv("KILN_TVM", raising=False)
    model = tiny_llama()
    ids = torch.randint(3, 320, (1, 5))
    ref_tokens, ref_logits = eager_greedy(model, ids, 4)
    torch._dynamo.reset()
    counts(reset=True)
    tokens, logits = eager_greedy(torch.compile(model, backend="kiln", options={"target": "cpu"}), ids, 4)
    c = counts()
    assert torch.equal(tokens, ref_tokens)
    assert max(rel_err(a, b) for a, b in zip(logits, ref_logits)) < 1e-5
    # 2 layers: 2 fused_add_rms_norm (and 2 rope: q and k) a layer a step, the final norm
    for op in sorted(cpu_kernels.TVM_OPS - QUANTISED_GEMVS):
        assert c.get(f"tvm:{op}", 0) >= 3, c
    assert not any(k.startswith("torch:") and "not chosen" not in k and "operands" not in k
                   for k in c), c

    # TVM's int4 GEMV lost to torch's at SmolLM2's shapes (not in TVM_OPS): chosen here to
    # run it inside a decode step.
    monkeypatch.setattr(cpu_kernels, "TVM_OPS", ALL_OPS)
    torch._dynamo.reset()
    fn = torch.compile(model, backend="kiln", options={"target": "cpu", "quant": "int4_weight_only"})
    counts(reset=True)
    tokens, logits = eager_greedy(fn, ids, 4)
    c = counts()
    # the prefill's rows run torch's GEMM; each decode step's 4 int4 GEMMs a layer run TVM's
    assert c.get("tvm:weight_int4_mm", 0) == 3 * 2 * 4, c
    monkeypatch.setenv("KILN_TVM", "0")
    _, torch_logits = eager_greedy(fn, ids, 4)
    assert max(rel_err(a, b) for a, b in zip(logits, torch_logits)) < 1e-2

    # Grouped int8: every linear, the LM head too, on TVM's GEMV at decode; both paths
    # keep x in float32, so TVM's logits are the torch path's (KILN_TVM=0) to fp32 rounding.
    monkeypatch.delenv("KILN_TVM")
    torch._dynamo.reset()
    fn = torch.compile(model, backend="kiln", options={"target": "cpu", "quant": "int8_weight_only_g32"})
    counts(reset=True)
    tokens, logits = eager_greedy(fn, ids, 4)
    c = counts()
    # the 5-token prefill is within the GEMV's rows too: 4 calls of 4 GEMMs a layer + the head
    assert c.get("tvm:weight_int8_grouped_mm", 0) == 4 * (2 * 4 + 1), c
    monkeypatch.setenv("KILN_TVM", "0")
    _, torch_logits = eager_greedy(fn, ids, 4)
    assert max(rel_err(a, b) for a, b in zip(logits, torch_logits)) < 1e-5
    torch._dynamo.reset()


def test_without_tvm_torch_runs_with_one_warning(monkeypatch):
    """No `cpu` extra: the ops run kiln_ref's torch code, counted, and one warning names
    the extra to install."""
    monkeypatch.setattr(tvm_build, "available", lambda: False)
    monkeypatch.setattr(tvm_build, "_warned", set())
    counts(reset=True)
    x, w = torch.randn(2, 96), torch.randn(96)
    with pytest.warns(RuntimeWarning, match=r"pip install 'kiln\[cpu\]'"):
        got = cpu_kernels.rms_norm(x, w, 1e-6)
    assert torch.equal(got, kiln_ref.rms_norm(x, w, 1e-6))
    cpu_kernels.rms_norm(x, w, 1e-6)
    assert counts() == {"torch:rms_norm:no tvm": 2}
