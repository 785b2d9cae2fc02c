"""The rewrite-rule language: `.kiln` files in the IR's own statement syntax, parsed by
lark (`rules.lark`) and compiled to `kiln.passes.pattern.Pattern` objects.

    // Llama RMSNorm; the comment lines right above a rule are its documentation.
    rule rms_norm {
      match (%x, %w, $eps, $d) {
        %xf = cast?(%x)                       // optional dtype cast
        %0 = aten.pow(%xf, 2)
        %1 = aten.mean(%0, dim=$d, keepdim=true)
        %2 = aten.add(%1, $eps)               // commutative: either operand order
        %3 = aten.rsqrt(%2)
        %4 = aten.mul(%xf, %3)
        %5 = aten.mul(%w, cast?(%4))          // inline optional cast
        yield %5
      }
      where last_dim(%0, $d), rank(%w) == 1, dim(%w, 0) == dim(%x, -1), is_float($eps)
      replace {
        %r = kiln.rms_norm(%x, %w, eps=$eps)
        yield %r
      }
    }

Reference (what the README documents):

- `match (params) { statements; yield %a[, %b] }`: params are the pattern's inputs,
  `%x` for values and `$c` for literals. Statements are `%r[, %s] = op(args)` without
  types; results not yielded are interior and may not be used outside the match.
  `%_` / `$_` match anything without binding.
- Arguments: positional operands by position; `name=pattern` attributes by name.
  Attributes a statement does not mention must be absent from the node (absent = the
  schema default); `...` as the last argument allows any others;
  `name=pattern default literal` matches a node without the attribute as if it had it
  (`scale=$s default none`, `attn_mask=%m default none`).
- Commutative ops (`kiln ops` lists traits) match either operand order.
- `op?(...)` is optional: when the op is not there, its result is its one value operand
  itself (`cast?(%x)`, `aten.mul?(%s, $scale)`); an op with several value operands names
  the one with `else`: `aten.add?(%s, %mask) else %s`. Pattern names used only inside an
  absent op are bound to none. `cast(%x)` is any dtype-only cast
  and `cast?(%x)` an optional one; both may be written inline as an operand.
- `aten.{amax, amin}(...)` in a rule's match is an op alternation: one spelling per op
  (every combination, with several); `{aten._grouped_mm, torch.x.y.default}(...)`
  alternates whole names.
- A rule may have several `match` blocks: spellings of one fusion that share its `where`
  conditions and its replacement (each yields as many values). A parameter one spelling
  does not declare is none in it (`qdtype=coalesce($qd, i8)`).
- `shared %r = op(...)`: matched but kept; it may have users outside the match.
- `fragment NAME { match (%p..., $c...) { ... yield %v } where ... }` defines a reusable
  sub-pattern, called like an op with its `%` parameters as arguments: `%k2 =
  repeat_kv?(%k)` (optional) or `repeat_kv(%k)`; its `$` constants are local to each
  use. Its `where` conditions hold only when it is present.
- `condition NAME(%v..., $c...) { c1, c2, ... }` names conditions once for several rules;
  `where NAME(%x, $k)` (a `$` parameter may also take a literal) holds when they all do.
- `where c1, c2, ...` (all must hold) over expressions: `== != < <= > >=`, `in {..}`,
  `not in {..}`, `and or not`, `+ - * /` (none if an operand is none), literals (numbers, true/false/none, dtypes
  like f32, lists), `%x`, `$c` and the functions in `FUNCTIONS`: dtype(%x), rank(%x),
  dim(%x, i), shape(%x), numel(%x), last_dim(%x, $d), is_float(x), is_int(x),
  is_none(x), is_input(%x), is_weight(%x) (a weight input), is_iota(%x) (torch.arange(n)), present(%x), coalesce(a, b, ...), sqrt(x), len(x),
  promote(dtype, dtype), float(x), int(x), floordiv(a, b),
  divisible(a, b), may_be_at_most(a, b) (a <= b, or a size not known until run time),
  and for attention masks (kiln.ir.masks) index_mask(%mask, %q, %k)
  (the mask only says causal and/or sliding window, in query/key indices),
  mask_causal(...) and mask_window(...), is_lm_head(%y) (only views and casts between %y
  and the graph's outputs) and feeds_router(%y) (softmax / top-k within a few views), and
  any registered from Python with `register_function(name, fn)` (`context=True`: `fn`
  gets the match's `RuleContext` first: the graph, users, outputs and compile options). Symbolic sizes compare exactly (`dim(%q, 2) ==
  dim(%k, 2)` holds for `s0 == s0`).
- `replace { %r = op(args) ... yield %r[, ...] }`: argument slots take the same
  expressions (`scale=coalesce($s, 1.0 / sqrt(dim(%q, -1)))`). It may read the match's
  inputs, its constants and shared statements, not interior values (except to ask
  `present(%v)` of an optional op: `renormalize=present(%renorm)`). Each yielded value
  must have exactly the type of the matched value it replaces, or the rewrite stops with
  `KilnRuleError` before touching the graph. Several `replace` blocks are tried in order:
  each but the last carries a condition (`replace when quant_dtype() == i8 { ... }`, an
  expression over the match like `where`'s), and the first that holds builds the
  replacement.

Rule files live in `passes/rules/*.kiln` (package data); `list_rules()` lists them.
`apply_rules(graph, text_or_path)` tries rules by hand: a rule that matches nothing then
raises `KilnRuleError` with how far its closest attempt got.
"""
from __future__ import annotations

import copy
import itertools
import math
import re
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable

import lark
import sympy
import torch

from kiln.ir import Value
from kiln.ir.masks import mask_form
from kiln.ir.ops import get_op, is_opaque
from kiln.ir.roles import is_weight
from kiln.ir.types import DTYPES, TensorType

from .pattern import (MISSING, AttrPat, Const, Constraint, KilnRuleError, ListPat, Lit, Match,
                      Pattern, ReplaceBuilder, Stmt, Var, dims_equal, feeds_router, is_lm_head)

# Package data, read through importlib.resources (a Traversable: an installed wheel, a zip).
RULES_DIR = files("kiln.passes").joinpath("rules")

__all__ = ["KilnRuleError", "parse_rules", "load_rules", "rule_files", "list_rules",
           "apply_rules", "FUNCTIONS", "RULES_DIR"]


@lru_cache(maxsize=None)
def _lark() -> lark.Lark:
    grammar = files("kiln.passes").joinpath("rules.lark").read_text(encoding="utf-8")
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True,
                     cache=True)


_HINTS = {"VALUE": "a value like %x", "CONST": "a constant like $eps", "OPNAME": "an op name",
          "NAME": "a name", "RPAR": "')'", "LPAR": "'('", "RBRACE": "'}'", "LBRACE": "'{'",
          "RSQB": "']'", "LSQB": "'['", "COMMA": "','", "EQUAL": "'='", "DTYPE": "a dtype",
          "INT": "an integer", "FLOAT": "a float", "YIELD": "yield", "CMPOP": "a comparison"}


def _expected(tokens) -> str:
    names = sorted({_HINTS.get(t, t.strip('"').lower()) for t in tokens})
    return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")


def _enclosing_rule(text: str, line: int | None) -> str | None:
    if line is None:
        return None
    head = "\n".join(text.splitlines()[:line])
    found = re.findall(r"\b(?:rule|fragment)\s+([A-Za-z_]\w*)", head)
    return found[-1] if found else None


# ---------------------------------------------------------------- expressions

def _dim_index(v, i):
    t = _tensor_type(v)
    return t.shape[int(i)]


def _tensor_type(v) -> TensorType:
    if not isinstance(v, Value) or not isinstance(v.type, TensorType):
        raise TypeError(f"expected a tensor value, got {v!r}")
    return v.type


def _last_dim(v, d) -> bool:
    r = _tensor_type(v).rank
    if isinstance(d, (list, tuple)):
        if len(d) != 1:
            return False
        d = d[0]
    return isinstance(d, int) and not isinstance(d, bool) and d in (-1, r - 1)


def _coalesce(*xs):
    for x in xs:
        if x is not None:
            return x
    return None


def _numel(v):
    out = 1
    for d in _tensor_type(v).shape:
        out = out * d
    return out


def _is_float(x) -> bool:
    if isinstance(x, Value):
        t = x.type
        return isinstance(t, TensorType) and t.dtype.is_floating_point
    return isinstance(x, float)


def _is_int(x) -> bool:
    if isinstance(x, Value):
        t = x.type
        return isinstance(t, TensorType) and not t.dtype.is_floating_point and t.dtype != torch.bool
    return isinstance(x, int) and not isinstance(x, bool)


def _index_mask(mask, q, k):
    """The causal/window form of an attention mask that compares query and key indices
    and nothing else (kiln.ir.masks), or None."""
    if not isinstance(mask, Value):
        return None
    form = mask_form(mask, _tensor_type(q).shape[2], _tensor_type(k).shape[2])
    return form if form is not None and form.positions is None and not form.opaque else None


def _is_iota(v) -> bool:
    """`v` is `torch.arange(n)`: an aten.arange from 0 in steps of 1."""
    n = v.producer if isinstance(v, Value) else None
    if n is None or n.op != "aten.arange":
        return False
    return (len(n.args) == 1 or (len(n.args) == 2 and n.args[0] == 0)) and n.attrs.get("step", 1) == 1


def _may_be_at_most(a, b) -> bool:
    """a <= b, or not known until run time (a symbolic size that may be that small)."""
    r = a <= b
    if isinstance(r, sympy.Basic):
        return r is not sympy.false
    return bool(r)


def _sqrt(x):
    return sympy.sqrt(x) if isinstance(x, sympy.Basic) else math.sqrt(x)


FUNCTIONS: dict[str, Callable] = {
    "dtype": lambda v: None if v is None else _tensor_type(v).dtype,
    "rank": lambda v: _tensor_type(v).rank,
    "dim": _dim_index,
    "shape": lambda v: list(_tensor_type(v).shape),
    "numel": _numel,
    "last_dim": _last_dim,
    "is_float": _is_float,
    "is_int": _is_int,
    "is_none": lambda x: x is None,
    "is_input": lambda v: isinstance(v, Value) and v.producer is None,
    "is_weight": lambda v: isinstance(v, Value) and v.producer is None and is_weight(v),
    "is_iota": _is_iota,
    "coalesce": _coalesce,
    "sqrt": _sqrt,
    "len": len,
    "promote": torch.promote_types,
    "float": float,
    "int": int,
    "floordiv": lambda a, b: _arith("//", a, b),
    "divisible": lambda a, b: b != 0 and dims_equal(_arith("//", a, b) * b, a),
    "may_be_at_most": _may_be_at_most,
    "index_mask": lambda m, q, k: _index_mask(m, q, k) is not None,
    "mask_causal": lambda m, q, k: _index_mask(m, q, k).causal,
    "mask_window": lambda m, q, k: _index_mask(m, q, k).window,
}
# present(%x) needs the match itself, not the value
_MATCH_FUNCTIONS = {"present"}
# these take the match's RuleContext before their arguments (register_function(context=True))
_CONTEXT_FUNCTIONS = {"feeds_router", "is_lm_head"}
FUNCTIONS["feeds_router"] = lambda cx, v: isinstance(v, Value) and feeds_router(v, cx.users)
FUNCTIONS["is_lm_head"] = lambda cx, v: isinstance(v, Value) and is_lm_head(v, cx.users, cx.outputs)
_KEYWORDS = {"rule", "fragment", "condition", "match", "where", "replace", "when", "yield", "shared", "default",
             "else", "and", "or", "not", "in", "true", "false", "none", "inf", "nan"}


def register_function(name: str, fn: Callable, replace: bool = False, context: bool = False) -> None:
    """Make `name(args)` usable in `where` conditions and replacement arguments of rules
    parsed from now on: predicates a rule cannot say, written in Python (`is_router(%x)`).
    `fn` gets what the arguments evaluate to: a `kiln.ir.Value` for `%x` (its `type`, its
    `producer` node), a Python value for `$c` and literals. With `context=True` it gets the
    match's `RuleContext` first (the graph, each value's users, the outputs, the compile
    options): for questions about a value's uses or the compile (`is_lm_head(%y)`,
    `quant_dtype()`)."""
    if not re.fullmatch(r"[A-Za-z_]\w*", name) or name in _KEYWORDS or name in _MATCH_FUNCTIONS:
        raise ValueError(f"register_function: {name!r} is not a name a rule can call "
                         f"(an identifier, not a keyword of the rule language)")
    if not callable(fn):
        raise TypeError(f"register_function: {name} must be given a callable, got {type(fn).__name__}")
    if name in FUNCTIONS and not replace:
        raise ValueError(f"register_function: {name} is already defined; pass replace=True to "
                         f"override it")
    FUNCTIONS[name] = fn
    if context:
        _CONTEXT_FUNCTIONS.add(name)
    else:
        _CONTEXT_FUNCTIONS.discard(name)


def _compare(op: str, a, b) -> bool:
    if op == "==":
        return dims_equal(a, b)
    if op == "!=":
        return not dims_equal(a, b)
    if a is None or b is None:
        return False
    fn = {"<": lambda x, y: x < y, "<=": lambda x, y: x <= y, ">": lambda x, y: x > y,
          ">=": lambda x, y: x >= y}[op]
    r = fn(a, b)
    if isinstance(r, sympy.Basic):
        return bool(r) if r in (sympy.true, sympy.false) else False
    return bool(r)


def _arith(op: str, a, b):
    if a is None or b is None:   # none propagates: `coalesce($scale, 1.0 / $div, 1.0)`
        return None
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a / b
    if op == "//":
        if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
            from torch.utils._sympy.functions import FloorDiv
            return FloorDiv(a, b)
        return a // b
    raise ValueError(op)


# ---------------------------------------------------------------- compiling one file

class _Scope:
    """Names visible in a rule: pattern names map to pattern elements (renamed inside
    fragment instances); replacement results are added as they are defined."""

    prefix = ""

    def __init__(self, names: dict[str, Any]):
        self.names = names


class _FileCompiler:
    def __init__(self, text: str, file: str):
        self.text = text
        self.file = file
        self.fragments: dict[str, lark.Tree] = {}
        self.conditions: dict[str, lark.Tree] = {}   # named `where` conditions
        self.rule = None
        self._n = 0

    # -- errors
    def error(self, node, message: str) -> KilnRuleError:
        line = col = None
        if isinstance(node, lark.Token):
            line, col = node.line, node.column
        elif isinstance(node, lark.Tree) and not node.meta.empty:
            line, col = node.meta.line, node.meta.column
        return KilnRuleError(message, self.rule, self.file, line, col, self.text)

    def compile(self, tree) -> list[Pattern]:
        items = [c for c in tree.children if c is not None]
        for it in items:
            if it.data == "fragment":
                name = str(it.children[0])
                if name in self.fragments:
                    self.rule = name
                    raise self.error(it.children[0], f"fragment {name} is defined twice")
                self.fragments[name] = it
        for it in items:
            if it.data == "condition":
                name = str(it.children[0])
                self.rule = name
                if name in self.conditions or name in self.fragments:
                    raise self.error(it.children[0], f"{name} is defined twice")
                if name in FUNCTIONS or name in _MATCH_FUNCTIONS:
                    raise self.error(it.children[0], f"condition {name} would hide the function "
                                                     f"{name}; name it otherwise")
                self.conditions[name] = it
        for name, it in self.conditions.items():   # check each once, even if unused
            self.rule = name
            params = [str(p.children[0]) for p in it.children[1:] if isinstance(p, lark.Tree)
                      and p.data == "param"]
            self.condition_body(it, _Scope({p: Var(p[1:]) if p[0] == "%" else Const(p[1:])
                                            for p in params}))
        out: list[Pattern] = []
        seen: set[str] = set()
        for it in items:
            if it.data != "rule":
                continue
            name = str(it.children[0])
            self.rule = name
            if name in seen:
                raise self.error(it.children[0], f"rule {name} is defined twice in {self.file}")
            seen.add(name)
            out.extend(self.compile_rule(it))
        for name, it in self.fragments.items():  # compile unused fragments too: report errors
            self.rule = name
            self.instantiate_fragment(it, [], None, None, check_only=True)
        return out

    # -- rules
    def compile_rule(self, t) -> list[Pattern]:
        """One Pattern per `match` block: the spellings of one rule, sharing its `where`
        conditions and its replacement. A parameter some spelling does not declare is
        bound to none in it."""
        name_tok, *rest = t.children
        matches = [c for c in rest if isinstance(c, lark.Tree) and c.data == "match"]
        wheres = [w for w in rest if isinstance(w, lark.Tree) and w.data == "where"]
        replaces = [c for c in rest if isinstance(c, lark.Tree) and c.data == "replace"]
        for r in replaces[:-1]:
            if r.children[0] is None:
                raise self.error(r, "only the last replace block may go without `when`: the "
                                    "blocks are tried in order, so the ones after it could never run")
        if replaces[-1].children[0] is not None:
            raise self.error(replaces[-1].children[0],
                             "the last replace block takes no `when`: it is what the rule does "
                             "when no earlier block's condition holds (a condition for the whole "
                             "rule goes in `where`)")
        matches = [variant for match_t in matches for variant in self.alternatives(match_t)]
        every: list[str] = []
        for match_t in matches:
            every += [p for p in self.params(match_t)[0] if p not in every]
        line = name_tok.line
        out = []
        for match_t in matches:
            stmts: list[Stmt] = []
            constraints: list[Constraint] = []
            declared, scope = self.params(match_t)
            params = declared + [p for p in every if p not in declared]
            for p in params[len(declared):]:
                scope.names[p] = Var(p[1:]) if p[0] == "%" else Const(p[1:])
            yields = self.match_body(match_t, scope, stmts, constraints, guard=None)
            for w in wheres:
                for e in w.children:
                    constraints.append(self.constraint(e, scope, None))
            self.check_uses(match_t, declared, scope, stmts, constraints)
            replace = self.compile_replaces(replaces, scope, stmts)
            pat = Pattern(str(name_tok), params, stmts, yields, constraints, replace,
                          doc=self.doc_before(line), file=self.file, line=line)
            try:
                pat.check()
            except KilnRuleError as e:
                raise KilnRuleError(e.bare, self.rule, self.file, e.line, e.column, self.text) from None
            for replace_t in replaces:
                n_rep = len([c for c in replace_t.children
                             if isinstance(c, lark.Tree) and c.data == "yield_"][0].children)
                if n_rep != len(yields):
                    raise self.error(match_t if len(matches) > 1 else replace_t,
                                     f"the match yields {len(yields)} values, the replacement {n_rep}")
            out.append(pat)
        return out

    def doc_before(self, line: int) -> str:
        lines = self.text.splitlines()
        doc: list[str] = []
        i = line - 2
        while i >= 0 and lines[i].strip().startswith("//"):
            doc.insert(0, lines[i].strip()[2:].strip())
            i -= 1
        return " ".join(doc)

    def params(self, match_t):
        params: list[str] = []
        scope: dict[str, Any] = {}
        for p in match_t.children:
            if isinstance(p, lark.Tree) and p.data == "param":
                tok = p.children[0]
                name = str(tok)
                if name in scope:
                    raise self.error(tok, f"parameter {name} is declared twice")
                params.append(name)
                scope[name] = Var(name[1:]) if name[0] == "%" else Const(name[1:])
        return params, _Scope(scope)

    def match_body(self, match_t, scope: _Scope, stmts, constraints, guard) -> list[str]:
        body = [c for c in match_t.children if isinstance(c, lark.Tree) and c.data != "param"]
        yields = []
        for s in body:
            if s.data == "mstmt":
                kids = list(s.children)
                shared = bool(kids and isinstance(kids[0], lark.Token) and kids[0].type == "SHARED")
                if kids[0] is None or shared:
                    kids = kids[1:]
                results_t, call_t = kids
                names = [str(tok) for tok in results_t.children]
                for tok in results_t.children:
                    if str(tok) in scope.names and str(tok) != "%_":
                        raise self.error(tok, f"{tok} is defined twice")
                self.call(call_t, names, scope, stmts, constraints, shared, guard, results_t)
            elif s.data == "yield_":
                for tok in s.children:
                    n = str(tok)
                    if n not in scope.names:
                        raise self.error(tok, f"yield of undefined {n}")
                    v = scope.names[n]
                    if not isinstance(v, Var) or v.name not in {r for st in stmts for r in st.results}:
                        raise self.error(tok, f"yield {n}: only values computed in the match "
                                              f"can be yielded")
                    yields.append(v.name)
        return yields

    def fresh(self, base: str) -> str:
        self._n += 1
        return f"{base}.{self._n}"

    def call(self, call_t, names: list[str], scope: _Scope, stmts, constraints, shared, guard,
             where_t) -> Var:
        callee_t = call_t.children[0]
        name_tok = callee_t.children[0]
        optional = len(callee_t.children) > 1 and callee_t.children[1] is not None
        callee = str(name_tok)
        if name_tok.type == "OPALT":
            raise self.error(name_tok, f"{callee}: an op alternation may stand in a rule's match "
                                       f"only; a fragment's ops are fixed (alternate in the rule, "
                                       f"or write one fragment per op)")
        else_t = next((a for a in call_t.children[1:]
                       if isinstance(a, lark.Tree) and a.data == "else_"), None)
        margs = [a for a in call_t.children[1:] if a is not None and a is not else_t]
        args, attrs, any_attrs = [], {}, False
        positional = []   # the argument trees, beside `args`
        for a in margs:
            if isinstance(a, lark.Tree) and a.data == "ellipsis":
                any_attrs = True
                continue
            if any_attrs:
                raise self.error(a, "`...` must be the last argument")
            if isinstance(a, lark.Tree) and a.data == "mkwarg":
                key, pat_t, default_t = a.children
                if str(key) in attrs:
                    raise self.error(key, f"attribute {key} given twice")
                pat = self.pat(pat_t, scope, stmts, constraints, guard)
                default = MISSING if default_t is None else self.literal_of(default_t)
                attrs[str(key)] = AttrPat(pat, default)
            else:
                if attrs:
                    raise self.error(a, "a positional argument follows a named one")
                args.append(self.pat(a, scope, stmts, constraints, guard))
                positional.append(a)
        passthrough = self.passthrough(name_tok, callee, optional, positional, args, else_t)
        # result names
        internal = []
        for n in names:
            internal.append("_" if n == "%_" else scope.prefix + n[1:])
        if callee in self.fragments:
            if shared:
                raise self.error(name_tok, "a fragment call cannot be shared")
            if attrs or any_attrs:
                raise self.error(name_tok, f"fragment {callee} takes positional arguments only")
            if len(names) != 1:
                raise self.error(name_tok, f"fragment {callee} yields one value")
            res = self.instantiate_fragment(self.fragments[callee], args, internal[0], passthrough,
                                            stmts=stmts, constraints=constraints,
                                            call_tok=name_tok, guard=guard)
            scope.names[names[0]] = Var(res)
            return Var(res)
        if callee == "cast":
            if len(args) != 1 or len(names) != 1:
                raise self.error(name_tok, "cast takes one value and gives one")
            op = "cast"
        else:
            if "." not in callee:
                raise self.error(name_tok, f"unknown op or fragment {callee!r} (ops are "
                                           f"qualified, like aten.add; fragments must be "
                                           f"defined in the same file)")
            try:
                get_op(callee)
            except KeyError as e:
                # One spelling of an alternation may be a custom op whose library registers
                # it only when imported (transformers' grouped_mm_fallback): no graph holds
                # it before then, and the rule matches it once one does.
                if not (name_tok.type == _CHOSEN_OP and is_opaque(callee)):
                    raise self.error(name_tok, str(e.args[0])) from None
            op = callee
        if optional and len(names) != 1:
            raise self.error(name_tok, f"optional {callee}? must have exactly one result")
        line, col = name_tok.line, name_tok.column
        s = Stmt(internal, op, args, attrs, any_attrs, passthrough, shared, line, col)
        stmts.append(s)
        for n, i in zip(names, internal):
            if n != "%_":
                scope.names[n] = Var(i)
        return Var(internal[0])

    def alternatives(self, match_t) -> list:
        """A match block with op alternations (`aten.{amax, amin}(...)`) as one block per
        choice (every combination): spellings of the rule like any other."""
        alts = [tok for tok in match_t.scan_values(_is_alternation)]
        if not alts:
            return [match_t]
        out = []
        for choice in itertools.product(*(_alternatives_of(str(tok)) for tok in alts)):
            variant = copy.deepcopy(match_t)
            picked = dict(zip((id(t) for t in variant.scan_values(_is_alternation)), choice))
            for tree in variant.iter_subtrees():
                tree.children = [lark.Token.new_borrow_pos(_CHOSEN_OP, picked[id(c)], c)
                                 if isinstance(c, lark.Token) and id(c) in picked else c
                                 for c in tree.children]
            out.append(variant)
        return out

    def passthrough(self, name_tok, callee: str, optional: bool, trees: list, args: list, else_t):
        """What an optional op's result is when the op is absent: the operand `else %v`
        names, or its only value operand. None for an op that is not optional."""
        if not optional:
            if else_t is not None:
                raise self.error(else_t.children[0], f"`else` follows an optional op only "
                                                     f"(write {callee}?(...) else %v)")
            return None
        if else_t is not None:
            tok = else_t.children[0]
            for t, a in zip(trees, args):
                if t.data == "pvalue" and str(t.children[0]) == str(tok):
                    return a
            raise self.error(tok, f"`else {tok}`: {tok} must be one of {callee}'s operands "
                                  f"(the value that stands for it when it is absent)")
        values = [a for t, a in zip(trees, args) if t.data in ("pvalue", "pcall")]
        if len(values) != 1:
            raise self.error(name_tok, f"optional {callee}? has {len(values) or 'no'} value operands: "
                                       f"name the one that stands for it when it is absent, "
                                       f"as in {callee}?(...) else %v")
        return values[0]

    def pat(self, t, scope: _Scope, stmts, constraints, guard):
        if isinstance(t, lark.Token):
            raise self.error(t, f"unexpected {t}")
        k = t.data
        if k == "pvalue":
            tok = t.children[0]
            n = str(tok)
            if n == "%_":
                return Var("_")
            if n not in scope.names:
                raise self.error(tok, f"{n} is used before it is defined (declare inputs in "
                                      f"match (...))")
            return scope.names[n]
        if k == "pconst":
            tok = t.children[0]
            n = str(tok)
            if n == "$_":
                return Const("_")
            if n not in scope.names:
                raise self.error(tok, f"{n} is not declared in match (...)")
            return scope.names[n]
        if k == "plist":
            return ListPat(tuple(self.pat(x, scope, stmts, constraints, guard)
                                 for x in t.children if x is not None))
        if k == "pcall":
            self._n += 1
            return self.call(t.children[0], [f"%inline.{self._n}"], scope, stmts, constraints,
                             False, guard, t)
        return Lit(self.literal_of(t))

    def literal_of(self, t):
        if isinstance(t, lark.Tree) and t.data in ("pvalue", "pconst", "plist", "pcall"):
            if t.data == "plist":
                return [self.literal_of(x) for x in t.children if x is not None]
            raise self.error(t, "expected a literal")
        return self.literal(t)

    def literal(self, t):
        k = t.data
        c = t.children
        if k == "int":
            return int(c[0])
        if k == "float":
            return float(c[0])
        if k == "inf":
            return math.inf
        if k == "nan":
            return math.nan
        if k == "neg":
            v = self.literal(c[0])
            return -v
        if k == "true":
            return True
        if k == "false":
            return False
        if k == "none":
            return None
        if k == "dtype":
            return DTYPES[str(c[0])]
        if k == "string":
            import json
            return json.loads(c[0])
        raise self.error(t, f"expected a literal, got {k}")

    # -- fragments
    def instantiate_fragment(self, frag_t, args, result: str | None, passthrough,
                             stmts=None, constraints=None, call_tok=None, guard=None,
                             check_only: bool = False) -> str:
        name_tok, match_t, *wheres = frag_t.children
        fname = str(name_tok)
        saved_rule = self.rule
        # `%` parameters are the fragment's arguments; `$` parameters are constants local
        # to each use of it
        allp = [str(p.children[0]) for p in match_t.children
                if isinstance(p, lark.Tree) and p.data == "param"]
        fparams = [p for p in allp if p[0] == "%"]
        if check_only:
            args = [Var(f"{fname}.{p[1:]}") for p in fparams]
            stmts, constraints = [], []
        elif len(args) != len(fparams):
            raise self.error(call_tok, f"fragment {fname} takes {len(fparams)} arguments, "
                                       f"got {len(args)}")
        prefix = self.fresh(fname)
        scope = _Scope(dict(zip(fparams, args)))
        for p in allp:
            if p[0] == "$":
                scope.names[p] = Const(f"{prefix}.{p[1:]}")
        inner: list[Stmt] = []
        inner_constraints: list[Constraint] = []
        sub = _FragmentScope(scope, prefix)
        yields = self.match_body(match_t, sub, inner, inner_constraints, guard)
        if len(yields) != 1:
            raise self.error(name_tok, f"fragment {fname} must yield exactly one value")
        yname = yields[0]
        # rename the yielded value to the caller's result name
        if result is not None and result != "_":
            _rename_stmts(inner, {yname: result})
            for key, v in list(sub.names.items()):
                if isinstance(v, Var) and v.name == yname:
                    sub.names[key] = Var(result)
            yname = result
        root_i = next(i for i, s in enumerate(inner) if yname in s.results) if not check_only \
            else None
        optional = passthrough is not None
        if optional:
            inner[root_i].passthrough = passthrough
        base = len(stmts)
        stmts.extend(inner)
        g = base + root_i if optional else guard
        for c in inner_constraints:
            constraints.append(c)
        for w in wheres:
            for e in w.children:
                c = self.constraint(e, sub, g)
                c.text = f"{fname}: {c.text}"
                constraints.append(c)
        self.rule = saved_rule
        return yname

    # -- where
    def constraint(self, e, scope, guard) -> Constraint:
        fn = self.expr(e, scope)
        text = self.text_of(e)
        return Constraint(lambda m, fn=fn: fn(m), text, guard, e.meta.line if not e.meta.empty else None)

    def text_of(self, t) -> str:
        if isinstance(t, lark.Tree) and not t.meta.empty:
            return self.text[t.meta.start_pos:t.meta.end_pos]
        return str(t)

    def expr(self, t, scope) -> Callable[[Match], Any]:
        if isinstance(t, lark.Token):
            raise self.error(t, f"unexpected {t}")
        k, c = t.data, t.children
        if k in ("evalue", "econst"):
            tok = c[0]
            n = str(tok)
            if n not in scope.names:
                raise self.error(tok, f"{n} is not defined in this rule")
            ref = scope.names[n]
            if isinstance(ref, Var):
                key = "%" + ref.name
                return lambda m: m.values.get(key)
            if isinstance(ref, Const):
                key = "$" + ref.name
                return lambda m: m.values.get(key)
            if isinstance(ref, Lit):
                return lambda m: ref.value
            if isinstance(ref, _Removed):
                raise self.error(tok, f"{n} is removed by the rewrite; a replacement may "
                                      f"read the match's inputs, its constants and shared "
                                      f"statements")
            raise self.error(tok, f"{n} cannot be used in an expression here")
        if k in ("int", "float", "inf", "nan", "true", "false", "none", "dtype", "string"):
            v = self.literal(t)
            return lambda m: v
        if k == "neg":
            f = self.expr(c[0], scope)
            return lambda m: -f(m)
        if k in ("add", "sub", "mul", "div"):
            op = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[k]
            fa, fb = self.expr(c[0], scope), self.expr(c[1], scope)
            return lambda m: _arith(op, fa(m), fb(m))
        if k == "compare":
            fa, op, fb = self.expr(c[0], scope), str(c[1]), self.expr(c[2], scope)
            return lambda m: _compare(op, fa(m), fb(m))
        if k in ("member", "not_member"):
            fa = self.expr(c[0], scope)
            items = [self.expr(x, scope) for x in c[1:] if x is not None]
            neg = k == "not_member"
            return lambda m: neg != any(dims_equal(fa(m), f(m)) for f in items)
        if k == "and_":
            fa, fb = self.expr(c[0], scope), self.expr(c[1], scope)
            return lambda m: bool(fa(m)) and bool(fb(m))
        if k == "or_":
            fa, fb = self.expr(c[0], scope), self.expr(c[1], scope)
            return lambda m: bool(fa(m)) or bool(fb(m))
        if k == "not_":
            fa = self.expr(c[0], scope)
            return lambda m: not fa(m)
        if k == "elist":
            items = [self.expr(x, scope) for x in c if x is not None]
            return lambda m: [f(m) for f in items]
        if k == "func":
            name_tok, *args_t = c
            fname = str(name_tok)
            args_t = [a for a in args_t if a is not None]
            if fname in self.conditions:
                return self.call_condition(name_tok, args_t, scope)
            if fname in _MATCH_FUNCTIONS:
                if len(args_t) != 1 or args_t[0].data != "evalue":
                    raise self.error(name_tok, f"{fname} takes one value, like {fname}(%x)")
                tok = args_t[0].children[0]
                ref = scope.names.get(str(tok))
                if isinstance(ref, _Removed):   # (a replacement asking about the match)
                    ref = ref.var
                if not isinstance(ref, Var):
                    raise self.error(tok, f"{tok} is not a value of this rule")
                return lambda m: m.present(ref.name)
            if fname not in FUNCTIONS:
                raise self.error(name_tok, f"unknown function {fname}; known: "
                                           f"{', '.join(sorted(list(FUNCTIONS) + list(_MATCH_FUNCTIONS)))}")
            fn = FUNCTIONS[fname]
            fargs = [self.expr(a, scope) for a in args_t]
            if fn is _coalesce:   # lazy: what follows the first value that is not none is not evaluated
                return lambda m: next((x for x in (f(m) for f in fargs) if x is not None), None)
            if fname in _CONTEXT_FUNCTIONS:
                return lambda m: fn(m.context, *[f(m) for f in fargs])
            return lambda m: fn(*[f(m) for f in fargs])
        raise self.error(t, f"unexpected {k} in an expression")

    # -- named conditions
    def condition_body(self, cond_t, scope: _Scope) -> Callable:
        """The conjunction of a condition's expressions, over `scope` (its parameters)."""
        exprs = [e for e in cond_t.children[1:] if isinstance(e, lark.Tree) and e.data != "param"]
        fns = [self.expr(e, scope) for e in exprs]
        return lambda m: all(f(m) for f in fns)

    def call_condition(self, name_tok, args_t, scope: _Scope) -> Callable:
        """`NAME(%a, $b)` in a `where`: the condition with its parameters standing for the
        caller's names (each argument a plain %value or $constant)."""
        cond_t = self.conditions[str(name_tok)]
        params = [str(p.children[0]) for p in cond_t.children[1:]
                  if isinstance(p, lark.Tree) and p.data == "param"]
        if len(args_t) != len(params):
            raise self.error(name_tok, f"condition {name_tok} takes {len(params)} arguments "
                                       f"({', '.join(params)}), got {len(args_t)}")
        names = {}
        for p, a in zip(params, args_t):
            if p[0] == "$" and a.data in _LITERALS:   # a literal constant
                names[p] = Lit(self.literal(a))
                continue
            tok = a.children[0] if a.data in ("evalue", "econst") else None
            if tok is None or str(tok)[0] != p[0]:
                raise self.error(a, f"condition {name_tok}: its argument for {p} must be a "
                                    f"{'value like %x' if p[0] == '%' else 'constant like $c or a literal'}")
            if str(tok) not in scope.names:
                raise self.error(tok, f"{tok} is not defined in this rule")
            names[p] = scope.names[str(tok)]
        return self.condition_body(cond_t, _Scope(names))

    # -- uses
    def check_uses(self, match_t, params, scope, stmts, constraints) -> None:
        used: set[str] = set()
        for s in stmts:
            for a in list(s.args) + [p.pat for p in s.attrs.values()]:
                _collect(a, used)
        for p in params:
            if p[1:] not in used and p not in used:
                tok = next(pt.children[0] for pt in match_t.children
                           if isinstance(pt, lark.Tree) and pt.data == "param"
                           and str(pt.children[0]) == p)
                raise self.error(tok, f"parameter {p} is never used in the match")

    # -- replace
    def compile_replaces(self, replaces, scope: _Scope, stmts: list[Stmt]):
        """The rule's replacement: the first `replace` block whose `when` holds on the match
        (the last has none)."""
        blocks = [(t.children[0], None if t.children[0] is None else self.expr(t.children[0], scope),
                   self.compile_replace(t, scope, stmts)) for t in replaces]
        rule, file, text = self.rule, self.file, self.text

        def replace(m: Match, b: ReplaceBuilder):
            for when_t, when, build in blocks:
                try:
                    chosen = when is None or when(m)
                except KilnRuleError:
                    raise
                except Exception as e:  # noqa: BLE001 - any error is the rule's, and says so
                    raise KilnRuleError(f"`when {self.text_of(when_t)}` raised {type(e).__name__}: "
                                        f"{e}; a condition must hold or fail, not raise",
                                        rule, file, when_t.meta.line, when_t.meta.column, text) from None
                if chosen:
                    return build(m, b)
        return replace

    def compile_replace(self, t, scope: _Scope, stmts: list[Stmt]):
        shared_names = {r for s in stmts if s.shared for r in s.results}
        matched_names = {r for s in stmts for r in s.results} - shared_names
        rscope = _Scope({})
        for n, v in scope.names.items():
            if isinstance(v, Var) and v.name in matched_names:
                rscope.names[n] = _Removed(n, v)
            else:
                rscope.names[n] = v
        steps = []
        yield_keys = []
        for c in t.children[1:]:   # (the first is the `when` condition or none)
            if c.data == "rstmt":
                results_t, op_tok, *args_t = c.children
                opname = str(op_tok)
                try:
                    get_op(opname)
                except KeyError as e:
                    raise self.error(op_tok, str(e.args[0])) from None
                pos, kw = [], {}
                for a in args_t:
                    if a is None:
                        continue
                    if a.data == "rkwarg":
                        key, e = a.children
                        if str(key) in kw:
                            raise self.error(key, f"attribute {key} given twice")
                        kw[str(key)] = self.expr(e, rscope)
                    else:
                        if kw:
                            raise self.error(a, "a positional argument follows a named one")
                        pos.append(self.expr(a, rscope))
                keys = []
                for tok in results_t.children:
                    n = str(tok)
                    if n in rscope.names and not isinstance(rscope.names[n], _Removed):
                        raise self.error(tok, f"{n} is already defined")
                    rscope.names[n] = Var("replace." + n[1:])
                    keys.append("%replace." + n[1:])
                steps.append((opname, pos, kw, keys, op_tok))
            elif c.data == "yield_":
                for tok in c.children:
                    ref = rscope.names.get(str(tok))
                    if not (isinstance(ref, Var) and ref.name.startswith("replace.")):
                        raise self.error(tok, f"yield {tok}: not a value computed in replace")
                    yield_keys.append("%" + ref.name)
        file = self.file

        def replace(m: Match, b: ReplaceBuilder):
            env = Match(m.pattern, m.graph, dict(m.values), m.nodes, m.context)
            for opname, pos, kw, keys, tok in steps:
                args = [f(env) for f in pos]
                attrs = {k: f(env) for k, f in kw.items()}
                try:
                    out = b.op(opname, *args, **attrs)
                except KilnRuleError as e:
                    raise KilnRuleError(e.bare, m.pattern.name, file, tok.line,
                                        tok.column) from None
                outs = out if isinstance(out, list) else [out]
                if len(outs) != len(keys):
                    raise KilnRuleError(f"{opname} gives {len(outs)} results, the rule names "
                                        f"{len(keys)}", m.pattern.name, file, tok.line,
                                        tok.column)
                env.values.update(zip(keys, outs))
            return [env.values[k] for k in yield_keys]
        return replace


class _FragmentScope(_Scope):
    """Inside a fragment: its own names get a unique prefix, its parameters map to the
    caller's arguments."""

    def __init__(self, outer: _Scope, prefix: str):
        self.names = dict(outer.names)
        self.prefix = prefix + "."


class _Removed:
    """A matched value the replacement cannot read (it is removed with the match); only
    `present(%v)` may name it."""
    def __init__(self, name: str, var: Var):
        self.name, self.var = name, var


def _collect(a, used: set[str]) -> None:
    if isinstance(a, Var):
        used.add(a.name)
        used.add("%" + a.name)
    elif isinstance(a, Const):
        used.add("$" + a.name)
    elif isinstance(a, ListPat):
        for x in a.items:
            _collect(x, used)


def _rename_stmts(stmts: list[Stmt], mapping: dict[str, str]) -> None:
    def ren(a):
        if isinstance(a, Var) and a.name in mapping:
            return Var(mapping[a.name])
        if isinstance(a, ListPat):
            return ListPat(tuple(ren(x) for x in a.items))
        if isinstance(a, AttrPat):
            return AttrPat(ren(a.pat), a.default)
        return a
    for s in stmts:
        s.results = [mapping.get(r, r) for r in s.results]
        s.args = [ren(a) for a in s.args]
        s.attrs = {k: ren(a) for k, a in s.attrs.items()}
        if s.passthrough is not None:
            s.passthrough = ren(s.passthrough)


# ---------------------------------------------------------------- public API

def parse_rules(text: str, file: str = "<string>") -> list[Pattern]:
    """Parses and compiles the rules of one .kiln text. Raises KilnRuleError with
    file:line:column and the rule's name."""
    try:
        tree = _lark().parse(text)
    except lark.exceptions.UnexpectedCharacters as e:
        raise KilnRuleError(f"unexpected character {text[e.pos_in_stream]!r}; expected "
                            f"{_expected(e.allowed)}", _enclosing_rule(text, e.line), file,
                            e.line, e.column, text) from None
    except lark.exceptions.UnexpectedToken as e:
        got = "end of input" if e.token.type == "$END" else repr(str(e.token))
        line = e.line if e.line != -1 else None
        raise KilnRuleError(f"unexpected {got}; expected {_expected(e.expected)}",
                            _enclosing_rule(text, line), file, line,
                            e.column if e.column != -1 else None, text) from None
    except lark.exceptions.UnexpectedEOF as e:
        raise KilnRuleError(f"unexpected end of input; expected {_expected(e.expected)}",
                            None, file, None, None, text) from None
    return _FileCompiler(text, file).compile(tree)


def rule_files() -> list[str]:
    """The rule files shipped with kiln (names without .kiln)."""
    return sorted(p.name[:-len(".kiln")] for p in RULES_DIR.iterdir()
                  if p.is_file() and p.name.endswith(".kiln"))


@lru_cache(maxsize=None)
def load_rules(name: str) -> tuple[Pattern, ...]:
    """The compiled rules of the packaged file `passes/rules/<name>.kiln`."""
    path = RULES_DIR.joinpath(f"{name}.kiln")
    if not path.is_file():
        raise KilnRuleError(f"no rule file {name}.kiln (have: {', '.join(rule_files())})",
                            file=str(path))
    return tuple(parse_rules(path.read_text(encoding="utf-8"), f"{name}.kiln"))


_LITERALS = ("int", "float", "inf", "nan", "true", "false", "none", "dtype", "string", "neg")


_CHOSEN_OP = "OPNAME_CHOSEN"   # an alternation's spelling, as `alternatives` substitutes it


def _is_alternation(t) -> bool:
    return isinstance(t, lark.Token) and t.type == "OPALT"


def _alternatives_of(text: str) -> list[str]:
    """`aten.{amax, amin}` -> [aten.amax, aten.amin]; without a common prefix, whole names:
    `{aten._grouped_mm, torch.transformers.grouped_mm_fallback.default}`."""
    prefix, _, names = text.partition("{")
    return [prefix + n.strip() for n in names.rstrip("}").split(",")]


def fragment_of(graph, name: str) -> str:
    """`graph` (one output) printed as a `.kiln` fragment: its inputs the parameters, its
    nodes the statements, without types; attributes a pattern cannot spell (devices,
    layouts) match anything (`$_`). `kiln rules trace` prints this for a captured
    function, as the start of a rule."""
    from kiln.ir.printer import format_literal, value_names
    if len(graph.outputs) != 1:
        raise ValueError(f"{name} returns {len(graph.outputs)} values; a fragment yields one: "
                         f"return the value the pattern should end in")
    names = value_names(graph)
    used = {a for n in graph.nodes for a in n.operands()} | set(graph.outputs)

    def lit(a) -> str:
        if isinstance(a, (torch.device, torch.layout, torch.memory_format)):
            return "$_"
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(lit(x) for x in a) + "]"
        return format_literal(a, names)
    params = ", ".join("%" + names[v] for v in graph.inputs if v in used)
    lines = [f"fragment {name} {{", f"  match ({params}) {{"]
    for n in graph.nodes:
        args = [lit(a) for a in n.args] + [f"{k}={lit(a)}" for k, a in n.attrs.items()]
        results = ", ".join("%" + names[r] for r in n.results)
        lines.append(f"    {results} = {n.op}({', '.join(args)})")
    lines += [f"    yield %{names[graph.outputs[0]]}", "  }", "}"]
    text = "\n".join(lines) + "\n"
    parse_rules(text, f"<traced {name}>")   # (a fragment that does not parse is kiln's bug)
    return text


def list_rules() -> list[tuple[str, str, str]]:
    """(file, rule name, doc) for every packaged rule, for `kiln rules`."""
    out = []
    for f in rule_files():
        for p in load_rules(f):
            if not out or out[-1][:2] != (f"{f}.kiln", p.name):   # (one line per rule, not spelling)
                out.append((f"{f}.kiln", p.name, p.doc))
    return out


def apply_rules(graph, source: str, require_match: bool = True, ctx=None) -> int:
    """Applies the rules of `source` (.kiln text, or the path of a .kiln file) to `graph`,
    in order; for trying a rule by hand. With `require_match`, a rule that matches
    nothing raises KilnRuleError saying where its closest attempt stopped."""
    from .pattern import apply_patterns
    file = "<string>"
    if source.endswith(".kiln") and "\n" not in source:
        file = source
        source = Path(source).read_text()
    return apply_patterns(graph, parse_rules(source, file), ctx, require_match=require_match)
