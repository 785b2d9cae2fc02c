"""MLIR export (kiln.frontends.mlir, `kiln dump --format mlir`): a model's graph after a
pass is written in torch-mlir's torch dialect, and torch-mlir's own parser reads the text
back to a module that prints identically; a small decomposed graph, lowered by torch-mlir
to linalg on tensors and run by its CPU execution engine, computes what kiln's reference
interpreter does; what cannot be exported says which op and what to do instead."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

pytest.importorskip("torch_mlir", reason="torch-mlir is not installed (the 'mlir' extra: make "
                                         "test installs it; the GPU machine's image lacks it)")
from torch_mlir import ir  # noqa: E402
from torch_mlir.dialects import torch as torch_dialect  # noqa: E402

from capture import rel_err  # noqa: E402
from kiln.cli import build_parser, main  # noqa: E402
from kiln.frontends.mlir import MlirExportError, to_mlir, to_mlir_module  # noqa: E402
from kiln.ir import parse, run  # noqa: E402
from models import tiny_llama_dir  # noqa: E402


def reparsed(text: str) -> str:
    """The text parsed by torch-mlir's bindings (torch dialect registered), verified and
    printed again."""
    context = ir.Context()
    torch_dialect.register_dialect(context)
    module = ir.Module.parse(text, context)
    assert module.operation.verify()
    return str(module)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """What `kiln dump` compiles for a tiny Llama (prefill and decode graphs, every pass),
    captured once for the CLI tests of this file."""
    from kiln import cli
    model = tiny_llama_dir(tmp_path_factory.mktemp("mlir") / "tiny")
    torch._dynamo.reset()
    return cli._capture(build_parser().parse_args(["dump", str(model)]))


@pytest.fixture
def dump(compiled, monkeypatch, capsys):
    """Runs `kiln dump` on the captured tiny Llama; returns (status, stdout, stderr)."""
    from kiln import cli
    monkeypatch.setattr(cli, "_capture", lambda args: compiled)

    def dump(*argv):
        status = main(["dump", "tiny", *argv])
        return (status, *capsys.readouterr())
    return dump


def test_dump_mlir_round_trips_through_torch_mlir(dump):
    status, out, err = dump("--format", "mlir", "--after", "fuse.activation")
    assert status == 0, err
    assert reparsed(out) == out
    assert out.startswith("module {\n  func.func @forward(")
    assert '{kiln.name = "input_ids"}' in out
    for op in ("rms_norm", "fused_add_rms_norm", "rope", "attention", "silu_mul"):
        assert f'torch.operator "torch.kiln.{op}"' in out, op
    # The prompt length stays dynamic; the StaticCache the graph writes is a mutable argument.
    assert "!torch.vtensor<[1,?],si64>" in out and "torch.overwrite.tensor.contents" in out


def test_dump_mlir_decomposed_to_a_directory(dump, tmp_path):
    status, out, err = dump("--format", "mlir", "--mlir-fused-ops", "decompose",
                            "--mlir-symbolic-shapes", "-o", str(tmp_path))
    assert status == 0, err
    texts = {}
    for graph in ("graph_0", "graph_1"):   # prefill, decode
        (path,) = (tmp_path / graph).glob("*.mlir")
        assert path.with_suffix(".kir").is_file() and path.stem.endswith("_schedule")
        texts[graph] = text = path.read_text()
        assert reparsed(text) == text
        assert "torch.kiln." not in text and "torch.aten.mm" in text
    # The prompt length is the prefill graph's one dynamic size.
    prefill = texts["graph_0"]
    assert 'torch.symbolic_int "s' in prefill and "torch.bind_symbolic_shape" in prefill


def test_mlir_options_need_format_mlir(dump):
    status, out, err = dump("--mlir-fused-ops", "decompose")
    assert status == 2 and out == ""
    assert err == "kiln dump: --mlir-fused-ops and --mlir-symbolic-shapes go with --format mlir\n"


NORM_MM_SILU = """func @forward(%x: f32[s0, 64], %w: f32[64], %b: f32[64, 96], %up: f32[s0, 96]) -> f32[s0, 96]
    where s0 in [1, 4096] {
  %0 = kiln.rms_norm(%x, %w, eps=1e-06) : f32[s0, 64]
  %1 = aten.mm(%0, %b) : f32[s0, 96]
  %2 = kiln.silu_mul(%1, %up) : f32[s0, 96]
  return %2
}"""

ROPE_ATTENTION = """func @forward(%q: f32[1, 4, s0, 16], %k: f32[1, 2, s0, 16], %v: f32[1, 2, s0, 16], %cos: f32[1, s0, 16], %sin: f32[1, s0, 16]) -> f32[1, 4, s0, 16]
    where s0 in [1, 4096] {
  %0 = kiln.rope(%q, %cos, %sin) : f32[1, 4, s0, 16]
  %1 = kiln.rope(%k, %cos, %sin) : f32[1, 2, s0, 16]
  %2 = kiln.attention(%0, %1, %v, none, scale=0.25, causal=true) : f32[1, 4, s0, 16]
  return %2
}"""

# From linalg on tensors to LLVM: bufferize (identity layouts at function boundaries, so the
# arguments are plain strided memrefs), loops, then the LLVM dialect, with the passes
# torch-mlir registers for its reference backend (TMTensor ops, memref copies, expanding
# ops LLVM lacks).
TO_LLVM = ",".join([
    "func.func(linalg-generalize-named-ops)", "func.func(linalg-fuse-elementwise-ops)",
    "convert-shape-to-std", "func.func(refback-generalize-tensor-pad)",
    "func.func(refback-generalize-tensor-concat)", "func.func(tm-tensor-bufferize)",
    "one-shot-bufferize{bufferize-function-boundaries "
    "function-boundary-type-conversion=identity-layout-map}",
    "func.func(buffer-deallocation-pipeline)", "func.func(tm-tensor-to-loops)",
    "func.func(refback-munge-memref-copy)", "func.func(convert-linalg-to-loops)",
    "func.func(lower-affine)", "convert-scf-to-cf", "func.func(refback-expand-ops-for-llvm)",
    "func.func(arith-expand)", "func.func(convert-math-to-llvm)", "convert-math-to-libm",
    "expand-strided-metadata", "finalize-memref-to-llvm", "lower-affine",
    "func.func(convert-arith-to-llvm)", "convert-func-to-llvm", "convert-cf-to-llvm",
    "reconcile-unrealized-casts"])


def run_on_cpu_engine(graph, inputs: list[torch.Tensor]) -> torch.Tensor:
    """Exports `graph` with its fused ops decomposed, lowers it with torch-mlir (torch
    backend contract, then linalg on tensors, then LLVM) and runs it with the MLIR
    execution engine; the graph must return one float32 tensor."""
    engine_module = pytest.importorskip(
        "torch_mlir.execution_engine", reason="this torch-mlir wheel has no execution engine")
    from torch_mlir.compiler_utils import (OutputType, lower_mlir_module,
                                           run_pipeline_with_repro_report)
    from torch_mlir.runtime import (as_ctype, get_ranked_memref_descriptor,
                                    make_nd_memref_descriptor, ranked_memref_to_numpy)
    module = to_mlir_module(graph, "decompose")
    run_pipeline_with_repro_report(
        module, "builtin.module(torchdynamo-export-to-torch-backend-pipeline)", "torch backend")
    lower_mlir_module(False, OutputType.LINALG_ON_TENSORS, module)
    assert "linalg.generic" in str(module) and "torch." not in str(module)
    with module.context:
        for func in module.body.operations:
            # A C entry point taking memref descriptors (result first), for ctypes.
            func.attributes["llvm.emit_c_interface"] = ir.UnitAttr.get()
    run_pipeline_with_repro_report(module, f"builtin.module({TO_LLVM})", "to LLVM")
    engine = engine_module.ExecutionEngine(module)
    result = make_nd_memref_descriptor(graph.outputs[0].type.rank, as_ctype(np.float32))()
    args = [ctypes.pointer(ctypes.pointer(get_ranked_memref_descriptor(t.numpy())))
            for t in inputs]
    engine.invoke(graph.name, ctypes.pointer(ctypes.pointer(result)), *args)
    return torch.from_numpy(ranked_memref_to_numpy(ctypes.pointer(result))).clone()


@pytest.mark.parametrize("text, shapes", [
    (NORM_MM_SILU, [(5, 64), (64,), (64, 96), (5, 96)]),
    (ROPE_ATTENTION, [(1, 4, 9, 16), (1, 2, 9, 16), (1, 2, 9, 16), (1, 9, 16), (1, 9, 16)]),
], ids=["rms_norm-mm-silu_mul", "rope-gqa_causal_attention"])
def test_decomposed_graph_runs_on_torch_mlir_cpu_engine(text, shapes):
    graph = parse(text)
    inputs = [torch.randn(s) for s in shapes]
    out = run_on_cpu_engine(graph, inputs)
    (expected,) = run(graph, inputs)
    assert out.shape == expected.shape
    assert rel_err(out, expected) < 1e-5


def test_in_place_kiln_op_is_no_custom_op():
    graph = parse("""func @forward(%q: f32[1, 4, 3, 16], %k: f32[1, 2, 3, 16], %v: f32[1, 2, 3, 16], %cos: f32[1, 3, 16], %sin: f32[1, 3, 16], %k_cache: f32[1, 2, 32, 16], %v_cache: f32[1, 2, 32, 16], %index: i64[3]) -> f32[1, 4, 3, 16] {
  %0, %1, %2 = kiln.rope_pair_store(%q, %k, %v, %cos, %sin, %k_cache, %v_cache, %index) : (f32[1, 4, 3, 16], f32[1, 2, 32, 16], f32[1, 2, 32, 16])
  return %0
}""")
    with pytest.raises(MlirExportError, match=r"^kiln.rope_pair_store writes its operands in "
                       r"place.*--mlir-fused-ops decompose"):
        to_mlir(graph, "custom")
    out = to_mlir(graph, "decompose")
    # The k cache (argument 5) is written in place: a mutable tensor, overwritten.
    assert "%arg5: !torch.tensor<[1,2,32,16],f32>" in out
    assert "torch.overwrite.tensor.contents" in out


def test_data_dependent_reference_is_exported_as_custom_op():
    graph = parse("""func @forward(%x: f32[s0, 8], %logits: f32[s0, 4], %w_gate_up: f32[4, 32, 8], %w_down: f32[4, 8, 16]) -> f32[s0, 8]
    where s0 in [1, 64] {
  %0 = kiln.fused_moe(%x, %logits, %w_gate_up, %w_down, top_k=2, renormalize=true) : f32[s0, 8]
  return %0
}""")
    with pytest.raises(MlirExportError, match=r"^kiln.fused_moe cannot be written as MLIR by its "
                       r"reference implementation.*--mlir-fused-ops custom"):
        to_mlir(graph, "decompose")
    assert 'torch.operator "torch.kiln.fused_moe"' in to_mlir(graph, "custom")


@torch.library.custom_op("kilnmlirtest::eager_only", mutates_args=())
def eager_only(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@torch.library.custom_op("kilnmlirtest::scale", mutates_args=())
def scale(x: torch.Tensor) -> torch.Tensor:
    return x * 2


scale.register_fake(lambda x: torch.empty_like(x))


def test_opaque_ops():
    """An op kiln has no schema for becomes what torch-mlir makes of it when torch can
    trace it; when torch cannot (no fake implementation), one message names it."""
    text = """func @forward(%x: f32[4, 8]) -> f32[4, 8] {
  %0 = torch.kilnmlirtest.OP.default(%x) : f32[4, 8]
  return %0
}"""
    out = to_mlir(parse(text.replace("OP", "scale")))
    assert 'torch.operator "torch.kilnmlirtest.scale"' in out and reparsed(out) == out
    with pytest.raises(MlirExportError, match=r"^torch.kilnmlirtest.eager_only.default cannot be "
                       r"written as MLIR: torch.export cannot trace it"):
        to_mlir(parse(text.replace("OP", "eager_only")))


def test_symbolic_size_input_must_be_a_dim_of_a_tensor_input():
    graph = parse("""func @forward(%n: sym(s1), %x: f32[s0, 8]) -> f32[s0, 8]
    where s0 in [1, 64], s1 in [1, 64] {
  return %x
}""")
    with pytest.raises(MlirExportError, match=r"^input %n: sym\(s1\) is not a dim of any tensor"):
        to_mlir(graph)
