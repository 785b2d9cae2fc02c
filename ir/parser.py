"""Text -> Graph, the mirror of `printer.py`.

Every failure, syntactic or semantic (an undefined value, an unknown op, a malformed type),
raises `KilnParseError` with the line and column and what was expected there.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib.resources import files

import lark
import torch

from .graph import Graph, Value
from .ops import get_op
from .types import DTYPES, ScalarType, SymIntType, TensorType, dim_from_ast


class KilnParseError(ValueError):
    def __init__(self, message: str, line: int | None = None, column: int | None = None,
                 source: str | None = None):
        self.line, self.column = line, column
        where = f"line {line}, column {column}: " if line is not None else ""
        text = where + message
        if source is not None and line is not None:
            lines = source.splitlines()
            if 0 < line <= len(lines):
                text += f"\n  {lines[line - 1]}\n  {' ' * max(column - 1, 0)}^"
        super().__init__(text)


@lru_cache(maxsize=None)
def _lark() -> lark.Lark:
    grammar = files("kiln.ir").joinpath("kir.lark").read_text(encoding="utf-8")
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


_TOKEN_HINTS = {
    "VALUE": "a value like %0 or %x", "OPNAME": "an op name like aten.add",
    "NAME": "a name", "DTYPE": "a dtype like f32", "INT": "an integer",
    "SIGNED_INT": "an integer", "FLOAT": "a float", "RPAR": "')'", "LPAR": "'('",
    "RSQB": "']'", "LSQB": "'['", "COMMA": "','", "COLON": "':'", "EQUAL": "'='",
    "LBRACE": "'{'", "RBRACE": "'}'", "ESCAPED_STRING": "a string",
}


def _expected(tokens) -> str:
    names = sorted({_TOKEN_HINTS.get(t, t.strip('"').lower()) for t in tokens})
    return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")


def parse(text: str) -> Graph:
    """Parses a graph: the first `func`; the ones after it are its `kiln.call` callees (as
    `print_graph` writes them). `parse_module` gives every func on its own."""
    main, *callees = parse_module(text)
    for f in callees:
        if f.name in main.functions or f.name == main.name:
            heads = [i for i, line in enumerate(text.splitlines(), 1)
                     if re.match(rf"\s*func\s*@{re.escape(f.name)}\s*\(", line)]
            line = heads[1] if len(heads) > 1 else None
            raise KilnParseError(f"func @{f.name} is defined twice", line, 1 if line else None, text)
        main.functions[f.name] = f
    return main


def parse_module(text: str) -> list[Graph]:
    try:
        tree = _lark().parse(text)
    except lark.exceptions.UnexpectedCharacters as e:
        raise KilnParseError(f"unexpected character {text[e.pos_in_stream]!r}; expected "
                             f"{_expected(e.allowed)}", e.line, e.column, text) from None
    except lark.exceptions.UnexpectedToken as e:
        got = "end of input" if e.token.type == "$END" else repr(str(e.token))
        raise KilnParseError(f"unexpected {got}; expected {_expected(e.expected)}",
                             e.line if e.line != -1 else None,
                             e.column if e.column != -1 else None, text) from None
    except lark.exceptions.UnexpectedEOF as e:
        raise KilnParseError(f"unexpected end of input; expected {_expected(e.expected)}",
                             None, None, text) from None
    except lark.exceptions.LarkError as e:  # any other grammar-level failure
        raise KilnParseError(str(e)) from None
    return [_Builder(text).func(f) for f in tree.children]


class _Builder:
    def __init__(self, source: str):
        self.source = source

    def error(self, node, message: str):
        meta = getattr(node, "meta", None)
        line = getattr(node, "line", None) or (meta.line if meta is not None and not meta.empty else None)
        col = getattr(node, "column", None) or (meta.column if meta is not None and not meta.empty else None)
        return KilnParseError(message, line, col, self.source)

    def func(self, t) -> Graph:
        kids = [k for k in t.children if k is not None]
        name = kids[0]
        params = [k for k in kids if isinstance(k, lark.Tree) and k.data == "param"]
        types = next(k for k in kids if isinstance(k, lark.Tree) and k.data == "types")
        where = next((k for k in kids if isinstance(k, lark.Tree) and k.data == "where"), None)
        stmts = [k for k in kids if isinstance(k, lark.Tree) and k.data == "stmt"]
        ret = kids[-1]

        g = Graph(str(name))
        self.env: dict[str, Value] = {}
        if where is not None:
            for r in where.children:
                sname, lo, hi, example = r.children
                if int(lo) > int(hi):
                    raise self.error(lo, f"empty range for {sname}: [{lo}, {hi}]")
                g.sym_ranges[str(sname)] = (int(lo), int(hi))
                if example is not None:
                    if not int(lo) <= int(example) <= int(hi):
                        raise self.error(example, f"example {example} of {sname} is outside [{lo}, {hi}]")
                    g.sym_hints[str(sname)] = int(example)
        for p in params:
            role, tok, ty = p.children
            vname = str(tok)[1:]
            if vname in self.env:
                raise self.error(tok, f"parameter %{vname} is declared twice")
            self.env[vname] = g.add_input(vname, self.type(ty), str(role) if role else "")
        for s in stmts:
            self.stmt(g, s)
        outs = [self.use(tok) for tok in ret.children if tok is not None]
        want = self.types(types)
        if len(want) != len(outs):
            raise self.error(ret, f"return gives {len(outs)} values but the signature "
                                  f"declares {len(want)} result types")
        for v, ty in zip(outs, want):
            if v.type != ty:
                raise self.error(ret, f"returned value has type {v.type}, the signature "
                                      f"declares {ty}")
        g.outputs = outs
        return g

    def use(self, tok) -> Value:
        name = str(tok)[1:]
        try:
            return self.env[name]
        except KeyError:
            raise self.error(tok, f"%{name} is used before it is defined") from None

    def stmt(self, g: Graph, s) -> None:
        kids = s.children
        j = 0
        defs = []
        while j < len(kids) and isinstance(kids[j], lark.Token) and kids[j].type == "VALUE":
            defs.append(kids[j])
            j += 1
        if j < len(kids) and kids[j] is None:  # placeholder for absent results
            j += 1
        opname = kids[j]
        args_t = kids[j + 1:-1]
        types = self.types(kids[-1])
        try:
            get_op(str(opname))
        except KeyError as e:
            raise self.error(opname, str(e.args[0])) from None
        args, attrs = [], {}
        for a in args_t:
            if a is None:
                continue
            if isinstance(a, lark.Tree) and a.data == "kwarg":
                key, lit = a.children
                if str(key) in attrs:
                    raise self.error(key, f"attribute {key} given twice")
                attrs[str(key)] = self.literal(lit)
            else:
                if attrs:
                    raise self.error(a, "a positional argument follows a named one")
                args.append(self.literal(a))
        if len(defs) != len(types):
            raise self.error(opname, f"{opname} defines {len(defs)} values but is annotated "
                                     f"with {len(types)} result types")
        node = g.add_node(str(opname), args, attrs, types)
        for tok, r in zip(defs, node.results):
            name = str(tok)[1:]
            if name in self.env:
                raise self.error(tok, f"%{name} is defined twice")
            self.env[name] = r

    def literal(self, t):
        if isinstance(t, lark.Token):  # a bare terminal kept by `?literal`
            raise self.error(t, f"unexpected {t}")
        kind = t.data
        c = t.children
        if kind == "value":
            return self.use(c[0])
        if kind == "int":
            return int(c[0])
        if kind == "float":
            return float(c[0])
        if kind == "true":
            return True
        if kind == "false":
            return False
        if kind == "none":
            return None
        if kind == "string":
            return json.loads(c[0])
        if kind == "dtype":
            return DTYPES[str(c[0])]
        if kind == "device":
            try:
                return torch.device(json.loads(c[1]))
            except RuntimeError as e:
                raise self.error(c[1], f"bad device {c[1]}: {e}") from None
        if kind == "enum":
            group, _, member = str(c[0]).partition(".")
            obj = getattr(torch, member, None)
            ok = isinstance(obj, torch.layout if group == "layout" else torch.memory_format)
            if not ok:
                raise self.error(c[0], f"unknown {group} {member}")
            return obj
        if kind == "list":
            return [self.literal(x) for x in c if x is not None]
        raise self.error(t, f"unexpected {kind}")

    def types(self, t) -> list:
        return [self.type(x) for x in t.children if x is not None]

    def type(self, t):
        if t.data == "tensor_type":
            dtype, *dims = t.children
            return TensorType(DTYPES[str(dtype)], tuple(self.dim(d) for d in dims if d is not None))
        if t.data == "sym_type":
            return SymIntType(self.dim(t.children[0]))
        return ScalarType(str(t.children[0]))

    def dim(self, t):
        try:
            return dim_from_ast(self._dim_ast(t))
        except KilnParseError:
            raise
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise self.error(t, f"bad dimension: {e}") from None

    def _dim_ast(self, t):
        if isinstance(t, lark.Token):
            raise self.error(t, f"unexpected {t} in a dimension")
        k, c = t.data, t.children
        if k == "dint":
            return ("int", int(c[0]))
        if k == "dsym":
            return ("sym", str(c[0]))
        if k == "dneg":
            return ("neg", self._dim_ast(c[0]))
        if k in ("dadd", "dsub", "dmul"):
            return (k[1:], self._dim_ast(c[0]), self._dim_ast(c[1]))
        if k == "dcall":
            fn = str(c[0])
            args = [self._dim_ast(x) for x in c[1:]]
            if fn in ("floordiv", "mod") and len(args) != 2:
                raise self.error(c[0], f"{fn} takes 2 arguments, got {len(args)}")
            return (fn, *args)
        raise self.error(t, f"unexpected {k} in a dimension")
