"""kiln.ir: types, ops, graph, text format, verifier, reference interpreter.

Imports nothing else of kiln."""
from . import kiln_ops  # noqa: F401  (registers the fused kiln.* ops)
from .graph import Graph, Node, Value
from .interpreter import run
from .ops import REGISTRY, OpDef, get_op, infer_types
from .parser import KilnParseError, parse, parse_module
from .printer import print_graph
from .types import DTYPES, ScalarType, SymIntType, TensorType, sym
from .verifier import VerifyError, verify

__all__ = ["Graph", "Node", "Value", "run", "REGISTRY", "OpDef", "get_op", "infer_types",
           "KilnParseError", "parse", "parse_module", "print_graph", "DTYPES", "ScalarType",
           "SymIntType", "TensorType", "sym", "VerifyError", "verify"]
