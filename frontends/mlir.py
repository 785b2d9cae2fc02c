"""kiln IR -> MLIR in torch-mlir's torch dialect, to feed kiln's fused graph to MLIR tools
(IREE, torch-mlir's own lowerings to linalg, TOSA or StableHLO).

The graph is run under `torch.export` by a loop over its nodes (the reference
interpreter's), so that torch traces it: aten ops trace to themselves, and kiln's fused
ops, by `fused_ops`,
- "custom": to one `torch.library` custom op per kiln op (`kiln::rms_norm`, its schema
  read off the reference implementation's signature), which the torch dialect spells
  `torch.operator "torch.kiln.rms_norm"`: the graph as kiln fused it, for a tool that
  brings its own kernels for kiln's ops;
- "decompose": through their reference implementation in plain torch, leaving ATen ops
  that torch-mlir lowers further (to linalg on tensors, say).
torch-mlir's FX importer then turns the exported program into the module. Ops kiln has no
schema for (opaque nodes) become what torch-mlir makes of any such op (`torch.operator`).
Dynamic sizes stay dynamic: `?` dims, and with `symbolic_shapes` also their relations and
ranges as `torch.symbolic_int` / `torch.bind_symbolic_shape` ops (IREE reads them;
torch-mlir's own lowering to linalg does not accept them). Symbolic-size inputs
(`%s52: sym(s0)`) are read off the tensor inputs' shapes, so the function takes the
graph's tensor inputs, in order, each argument carrying its kiln name as `kiln.name`;
inputs the graph writes in place (a StaticCache's tensors) are `!torch.tensor` arguments
whose contents the function overwrites.
"""
from __future__ import annotations

import warnings

import sympy
import torch

from kiln.ir import Graph, get_op
from kiln.ir.interpreter import run
from kiln.ir.types import SymIntType, TensorType

FUSED_OPS = ("custom", "decompose")


class MlirExportError(ValueError):
    """A graph that cannot be written as MLIR; the message names the op and the way out."""


def to_mlir(graph: Graph, fused_ops: str = "custom", symbolic_shapes: bool = False) -> str:
    """The graph as the text of an MLIR module in the torch dialect: one `func.func` named
    after the graph."""
    return str(to_mlir_module(graph, fused_ops, symbolic_shapes))


def to_mlir_module(graph: Graph, fused_ops: str = "custom", symbolic_shapes: bool = False):
    """As `to_mlir`, the `torch_mlir.ir.Module` itself (in a context of its own with the
    torch dialect registered), for running MLIR passes on it."""
    from kiln.extras import require
    require("mlir", "MLIR export")
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_dialect
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table
    from torch_mlir.extras.fx_importer import FxImporter

    if fused_ops not in FUSED_OPS:
        raise MlirExportError(f"fused_ops={fused_ops!r}: expected one of {', '.join(FUSED_OPS)}")
    _check_exportable(graph, fused_ops)
    program = _export(graph, fused_ops)
    # torch-mlir's table (what its own FX path decomposes before import), so the module
    # holds the ops its lowerings expect; but SDPA stays whole, as in kiln's capture: its
    # decomposition's result has other strides than the op's, and a captured `view` of that
    # result then fails when the program is traced again.
    table = {op: fn for op, fn in get_decomposition_table().items()
             if "scaled_dot_product" not in op.name()}
    with warnings.catch_warnings():
        # torch 2.13 deep-copies its own pytree specs here and warns that they use a
        # deprecated class: nothing the user did or can change.
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)`", FutureWarning)
        program = program.run_decompositions(table)
    context = ir.Context()
    torch_dialect.register_dialect(context)
    importer = FxImporter(context=context)
    func = importer.import_program(program, func_name=graph.name,
                                   import_symbolic_shape_expressions=symbolic_shapes)
    with context:
        func.attributes["arg_attrs"] = ir.ArrayAttr.get(
            [ir.DictAttr.get({"kiln.name": ir.StringAttr.get(v.name)})
             for v in _tensor_inputs(graph)])
    return importer.module


def _tensor_inputs(graph: Graph):
    return [v for v in graph.inputs if isinstance(v.type, TensorType)]


def _check_exportable(graph: Graph, fused_ops: str) -> None:
    """What can be told before tracing: inputs the exported function cannot take, kiln ops
    a custom op cannot stand for."""
    dims = {d for v in _tensor_inputs(graph) for d in v.type.shape}
    for v in graph.inputs:
        if isinstance(v.type, TensorType):
            odd = [d for d in v.type.shape if not isinstance(d, (int, sympy.Symbol))]
            if odd:
                raise MlirExportError(
                    f"input %{v.name}: {v.type} has the size {odd[0]}; MLIR export takes "
                    f"inputs whose sizes are integers or single symbols")
        elif not (isinstance(v.type, SymIntType) and v.type.expr in dims):
            raise MlirExportError(
                f"input %{v.name}: {v.type} is not a dim of any tensor input; MLIR export "
                f"takes tensor inputs and the symbolic sizes of their dims")
    for g in [graph, *graph.functions.values()]:
        for n in g.nodes:
            if fused_ops == "custom" and n.op.startswith("kiln.") and get_op(n.op).has("mutates"):
                raise MlirExportError(
                    f"{n.op} writes its operands in place, which a custom op in the torch "
                    f"dialect cannot say; export with --mlir-fused-ops decompose "
                    f"(fused_ops='decompose')")


def _export(graph: Graph, fused_ops: str) -> torch.export.ExportedProgram:
    inputs = _tensor_inputs(graph)
    dims = {d: _export_dim(graph, d.name)
            for v in inputs for d in v.type.shape if isinstance(d, sympy.Symbol)}
    examples = tuple(torch.empty([_example_size(graph, d) for d in v.type.shape],
                                 dtype=v.type.dtype) for v in inputs)
    dynamic = tuple({i: dims[d] for i, d in enumerate(v.type.shape) if d in dims} or None
                    for v in inputs)
    return torch.export.export(_GraphProgram(graph, fused_ops), examples,
                               dynamic_shapes=(dynamic,), strict=False)


def _export_dim(graph: Graph, symbol: str) -> torch.export.Dim:
    lo, hi = graph.sym_ranges.get(symbol, (1, None))
    return torch.export.Dim(symbol, min=lo, max=hi)


def _example_size(graph: Graph, d) -> int:
    """A size to trace with: the capture's example, else the smallest in the symbol's range
    that is not 0 or 1 (which export would specialise on)."""
    if isinstance(d, int):
        return d
    hint = graph.sym_hints.get(d.name)
    if hint is not None and hint >= 2:
        return hint
    lo, hi = graph.sym_ranges.get(d.name, (1, None))
    return max(lo, 2) if hi is None else min(max(lo, 2), hi)


class _GraphProgram(torch.nn.Module):
    """Runs a kiln graph on its tensor inputs, for torch.export to trace."""

    def __init__(self, graph: Graph, fused_ops: str):
        super().__init__()
        self.graph = graph
        self.fused_ops = fused_ops

    def forward(self, *tensors):
        inputs = _tensor_inputs(self.graph)
        values = dict(zip(inputs, tensors))
        sizes = {}
        for v, t in zip(inputs, tensors):
            for d, size in zip(v.type.shape, t.shape):
                sizes.setdefault(d, size)
        for v in self.graph.inputs:
            if isinstance(v.type, SymIntType):
                values[v] = sizes[v.type.expr]
        return tuple(run(self.graph, [values[v] for v in self.graph.inputs],
                         _traced_impl(self.fused_ops)))


def _traced_impl(fused_ops: str):
    """The interpreter's `impl`: kiln's fused ops as custom ops or their reference bodies,
    and whatever stops the trace reported as the op it stopped at."""
    def impl(op: str):
        def call(*args, **attrs):
            try:
                if op.startswith("kiln.") and fused_ops == "custom":
                    return _custom_op(op)(*args, **attrs)
                return get_op(op).impl(*args, **attrs)
            except MlirExportError:
                raise
            except Exception as e:  # noqa: BLE001 - whatever stops the trace, it stopped here
                raise MlirExportError(_untraceable(op, fused_ops, e)) from e
        return call
    return impl


def _untraceable(op: str, fused_ops: str, error: Exception) -> str:
    reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
    if op.startswith("kiln.") and fused_ops == "decompose":
        return (f"{op} cannot be written as MLIR by its reference implementation, which "
                f"torch.export cannot trace ({reason}); export it as a custom op with "
                f"--mlir-fused-ops custom (fused_ops='custom')")
    if op.startswith("kiln."):
        return (f"{op} cannot be written as MLIR as a custom op ({reason}); try "
                f"--mlir-fused-ops decompose (fused_ops='decompose')")
    return (f"{op} cannot be written as MLIR: torch.export cannot trace it ({reason}); "
            f"export the graph after a pass that replaces it, or before the one that made it")


_CUSTOM_OPS: dict[str, object] = {}


def _custom_op(name: str):
    """The custom op `kiln::<op>` standing for the kiln op `name`, defined on first use:
    schema and eager implementation are the reference implementation's, and so are its
    result shapes, by running that on fake tensors, except where `_SHAPES` gives them."""
    if name not in _CUSTOM_OPS:
        short = name[len("kiln."):]
        ref = get_op(name).impl
        custom = torch.library.custom_op(f"kiln::{short}", ref, mutates_args=())
        custom.register_fake(_SHAPES.get(short, ref))
        _CUSTOM_OPS[name] = custom
    return _CUSTOM_OPS[name]


def _attention_shape(q, k, v, mask, scale, causal, window=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _fused_moe_shape(x, router_logits, w_gate_up, w_down, top_k, renormalize, expert_start=0):
    return torch.empty_like(x)


# Result shapes of the ops whose reference cannot run on fake tensors: it reads the data
# (fused_moe), or specialises a dynamic size (attention); kiln_ops types them by rule for
# the same reason.
_SHAPES = {"attention": _attention_shape, "fused_moe": _fused_moe_shape}
