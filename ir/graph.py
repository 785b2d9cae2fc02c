"""Graph, Node, Value: a function in SSA form.

A Graph has typed inputs, a list of Nodes in topological order, and outputs. A Node is one
op applied to arguments: positional `args` and named `attrs`, each a literal (int, float,
bool, None, str, dtype, device, layout, memory format, or a list of these) or a Value.
Values anywhere in args/attrs are the node's operands. Nodes own their typed results.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator


from .types import Type

_ids = itertools.count()


class Value:
    __slots__ = ("type", "name", "producer", "index", "uid", "role")

    def __init__(self, type: Type, name: str | None = None, producer: "Node | None" = None,
                 index: int = 0, role: str = ""):
        self.type = type
        self.name = name            # inputs keep their names; results are numbered on print
        self.role = role            # inputs: what the caller binds (kiln.ir.roles)
        self.producer = producer    # None for graph inputs
        self.index = index          # which result of the producer
        self.uid = next(_ids)

    @property
    def is_input(self) -> bool:
        return self.producer is None

    def __repr__(self) -> str:
        return f"Value({self.name or '#' + str(self.uid)}: {self.type})"


def walk_values(arg: Any) -> Iterator[Value]:
    if isinstance(arg, Value):
        yield arg
    elif isinstance(arg, (list, tuple)):
        for a in arg:
            yield from walk_values(a)


def map_values(arg: Any, fn: Callable[[Value], Any]) -> Any:
    if isinstance(arg, Value):
        return fn(arg)
    if isinstance(arg, list):
        return [map_values(a, fn) for a in arg]
    if isinstance(arg, tuple):
        return tuple(map_values(a, fn) for a in arg)
    return arg


class Node:
    __slots__ = ("op", "args", "attrs", "results", "meta")

    def __init__(self, op: str, args: list, attrs: dict[str, Any], result_types: Iterable[Type]):
        self.op = op
        self.args = list(args)
        self.attrs = dict(attrs)
        self.results = [Value(t, None, self, i) for i, t in enumerate(result_types)]
        self.meta: dict[str, Any] = {}

    @property
    def result(self) -> Value:
        if len(self.results) != 1:
            raise ValueError(f"{self.op} has {len(self.results)} results; use .results")
        return self.results[0]

    def operands(self) -> list[Value]:
        return list(walk_values(self.args)) + list(walk_values(list(self.attrs.values())))

    def replace_uses(self, mapping: dict[Value, Value]) -> None:
        fn = lambda v: mapping.get(v, v)  # noqa: E731
        self.args = map_values(self.args, fn)
        self.attrs = {k: map_values(a, fn) for k, a in self.attrs.items()}

    def __repr__(self) -> str:
        return f"Node({self.op})"


class Graph:
    def __init__(self, name: str = "forward"):
        self.name = name
        self.inputs: list[Value] = []
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []
        self.sym_ranges: dict[str, tuple[int, int]] = {}
        self.sym_hints: dict[str, int] = {}     # example sizes seen at capture
        self.meta: dict[str, Any] = {}
        # Callees of `kiln.call` nodes (the kernels `schedule` outlines), by name. They share
        # this graph's symbols and are printed after it, in the same text.
        self.functions: dict[str, "Graph"] = {}

    # ---- building ----
    def add_input(self, name: str, type: Type, role: str = "") -> Value:
        v = Value(type, name, role=role)
        self.inputs.append(v)
        return v

    def add_node(self, op: str, args: list, attrs: dict | None = None,
                 result_types: Iterable[Type] = (), before: Node | None = None) -> Node:
        node = Node(op, args, attrs or {}, result_types)
        if before is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self.nodes.index(before), node)
        return node

    def call(self, op: str, *args, **attrs) -> Value | list[Value]:
        """Appends `op(*args, **attrs)` with result types from the op's type inference."""
        from .ops import infer_types
        types = infer_types(op, list(args), attrs, self)
        node = self.add_node(op, list(args), attrs, types)
        return node.results[0] if len(node.results) == 1 else node.results

    # ---- queries ----
    def output_types(self) -> list[Type]:
        return [v.type for v in self.outputs]

    def users(self) -> dict[Value, list[Node]]:
        out: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for v in n.operands():
                out.setdefault(v, []).append(n)
        return out

    def use_counts(self) -> dict[Value, int]:
        counts: dict[Value, int] = {}
        for n in self.nodes:
            for v in n.operands():
                counts[v] = counts.get(v, 0) + 1
        for v in self.outputs:
            counts[v] = counts.get(v, 0) + 1
        return counts

    def symbols(self) -> set[str]:
        out: set[str] = set()
        for v in self.inputs:
            out |= v.type.symbols()
        return out

    # ---- rewriting ----
    def replace_all_uses(self, old: Value, new: Value) -> None:
        self.replace_uses({old: new})

    def replace_uses(self, mapping: dict[Value, Value]) -> None:
        for n in self.nodes:
            n.replace_uses(mapping)
        self.outputs = [mapping.get(v, v) for v in self.outputs]

    def remove_nodes(self, dead: Iterable[Node]) -> None:
        dead_ids = {id(n) for n in dead}
        self.nodes = [n for n in self.nodes if id(n) not in dead_ids]

    def copy(self) -> "Graph":
        """A structural copy: new Values and Nodes, same literals."""
        g = Graph(self.name)
        g.sym_ranges = dict(self.sym_ranges)
        g.sym_hints = dict(self.sym_hints)
        g.meta = dict(self.meta)
        g.functions = dict(self.functions)   # callees are never rewritten in place
        mapping: dict[Value, Value] = {}
        for v in self.inputs:
            mapping[v] = g.add_input(v.name, v.type, v.role)
        fn = lambda v: mapping[v]  # noqa: E731
        for n in self.nodes:
            m = g.add_node(n.op, map_values(n.args, fn),
                           {k: map_values(a, fn) for k, a in n.attrs.items()},
                           [r.type for r in n.results])
            m.meta = dict(n.meta)
            for old, new in zip(n.results, m.results):
                mapping[old] = new
        g.outputs = [mapping[v] for v in self.outputs]
        return g

    # ---- views ----
    def __str__(self) -> str:
        from .printer import print_graph
        return print_graph(self)

    def verify(self) -> None:
        from .verifier import verify
        verify(self)

    def to_networkx(self):
        """The dataflow DiGraph: one vertex per node (and per graph input), edges along values."""
        import networkx as nx
        dg = nx.DiGraph()
        for v in self.inputs:
            dg.add_node(v, kind="input")
        for n in self.nodes:
            dg.add_node(n, kind="op", op=n.op)
            for v in n.operands():
                src = v if v.is_input else v.producer
                dg.add_edge(src, n, value=v)
        return dg

