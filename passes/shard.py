"""shard.tensor_parallel: one rank's share of the graph, for N ranks on torch.distributed.

Why a sharding analysis and not a table of layer names: the captured graph is all there
is (weights are anonymous inputs, modules are gone), and models differ in exactly the
places a table would hard-code: q/k-norms, GQA with fewer KV heads than ranks, biases,
tied heads, where the cache writes sit. So the pass asks of every value which part of it
a rank holds, and rewrites the graph only where the answer is proven for every use.

A value is *replicated* (every rank holds all of it), *partial* (every rank holds a
summand; the sum over ranks is the value), or *sharded*: along one dim, whose size is
`outer x size`, rank r holds the elements [lo_r, hi_r) of the `size` part (under each of
the `outer` indices). The ranges may overlap (KV heads kept by several ranks).

Where sharding comes from: a linear layer (`mm(x, permute(W, [1, 0]))`, `addmm`, or a W
used as [K, N]) with W a weight input and a replicated x is a *candidate*: its output
features could be split, each rank computing its rows of W (column-parallel). The
ranges are not fixed there but where the graph first says what the features are:
the reshape that splits them into [heads, head_dim] fixes them to whole heads (an even
split when heads divide by N; N divisible by heads keeps each head on N / heads ranks:
replicated KV heads), a join with another candidate (gate and up) to a common split. The
state then flows through elementwise ops (broadcast operands that are replicated are
sliced to the rank's part), views (reshape attributes rewritten to local sizes),
reductions and norms over other dims (per-head q/k-norm), RoPE, attention (q and KV heads
split alike; GQA keeps its ratio, and KV heads that several ranks need are held by each of
them), and the KV-cache writes: a written cache input is sliced per rank with a view
(`aten.slice`), so each rank's write lands in the caller's tensor, on the heads it owns.
A linear that reads a sharded x contracts over its rank's part of K (row-parallel: W's
columns sliced); its output is partial, and a `kiln.all_reduce` makes it whole where
something needs the whole value: after the reshape back to [B, S, H], right before the
residual add, where fuse.collective can fuse it with the add and the next RMSNorm. A bias
is added once, after the reduction.

Anything the analysis cannot prove -- a reduction over the sharded dim (an MoE router's
softmax, a norm over the features), a view that cuts across a head, an op it has no rule
for -- blames the candidates whose split reached it; they stay replicated and the analysis
runs again, until a round goes through without a failure. So the pass never produces a
wrong graph, only, at worst, a less sharded one. Known such cases: a q/k/v or gate/up
projection stored as one weight and split after the GEMM (a split of the split dim; the
whole projection stays replicated), and a KV projection with fewer heads than ranks whose
head dim RoPE slices (it stays replicated; each rank slices out the heads its queries read,
which inside the [B * H] of hand-written attention is a reshape, a slice and a reshape
back, where fuse.attention then finds no repeat_kv to fold).

Graph outputs must keep their meaning: a sharded output is gathered (`kiln.all_gather`,
then slices when ranks' parts overlap). That is how the LM head is sharded: it is an
ordinary candidate whose vocab-sized output reaches the logits, so it runs
column-parallel and one all_gather on the vocab dim rebuilds the logits: each rank reads
1/N of the largest weight of a decode step, for one small collective. The embedding stays
replicated: a lookup reads a few rows, so splitting it would save memory but no time, and
would cost a collective. The KV caches a prefill creates inside the graph (transformers'
lazily initialised StaticCache) are outputs too: they are gathered, so the caller's cache
holds every head; the later decode graphs write their rank's heads of it through views.

Weights are sliced with `aten.slice` (+ `aten.contiguous` for W's columns), which read
weight inputs only, so weight preparation (passes/weight_prep.py) computes them once per
set of weights, not on every call; each rank still receives the full weights.

MoE experts are split whole (expert parallelism) after fuse.moe, by `shard.experts`
(`shard_experts` below, registered by passes/collective.py): each rank keeps E / N of
a `kiln.fused_moe`'s experts, routing (softmax and top-k over all E) stays replicated and
exact, the op's `expert_start` attribute tells it which experts its weights are, and an
all_reduce adds the ranks' sums. One mechanism, on the fused op only: in the captured
form the experts are a sort of tokens by expert and two grouped GEMMs over offsets, which
no slice of the weights splits exactly. Without fuse.moe (an MoE form it does not match)
the experts stay replicated.

Collectives meet across ranks in graph order, so every rank must compile the same graph
up to the slice bounds: the analysis depends on shapes and options only, never on the
rank, which picks the ranges at rewrite time. KILN_PASS_LIMIT counts the whole sharding as
one rewrite (half a sharding is not a smaller correct one). The sharded graph's
`meta["tensor_parallel"]` says which share it is ({"size", "rank"}); the pass leaves such
a graph alone.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

import sympy

from kiln.ir import Graph, Node, TensorType, Value
from kiln.ir.graph import map_values
from kiln.ir.ops import get_op, infer_types, written_values
from kiln.ir.roles import is_weight
from kiln.ir.types import make_dim

from .canonicalize import dce
from .manager import PassContext, register_pass

PARTIAL = "partial"   # the state of a partial sum; None is replicated; a Shard is sharded
MAX_ROUNDS = 256
log = logging.getLogger("kiln.passes")


class ShardFail(Exception):
    """The analysis cannot prove an op shardable: the candidates in `blame` stay replicated."""

    def __init__(self, why: str, blame):
        super().__init__(why)
        self.why, self.blame = why, frozenset(blame)


@dataclass(eq=False)
class Root:
    """A column-parallel candidate: a linear layer whose `features` outputs may split."""
    node: Node
    features: int
    ranges: tuple | None = None   # per rank (lo, hi) over the features, once decided


@dataclass(frozen=True)
class Shard:
    """Sharded along `dim` (of size outer * size): rank r holds elements ranges[r] of the
    `size` part. The ranges are `root.ranges * scale`, or `fixed`."""
    dim: int
    outer: Any                     # int or sympy expression
    size: int
    root: Root | None = None
    scale: Fraction = Fraction(1)
    fixed: tuple | None = None
    blame: frozenset = frozenset()

    def moved(self, dim: int) -> "Shard":
        return replace(self, dim=dim)


@dataclass
class Plan:
    """How one node runs on a rank: its results' states, what each operand must be locally
    (replicated, partial, or a sharded state to slice a replicated value to), new
    attributes, and a special lowering (`kind`) for linears."""
    results: list
    needs: dict = field(default_factory=dict)       # Value -> state
    attrs: dict | None = None
    kind: str = "generic"                           # generic | column | row
    info: dict = field(default_factory=dict)


def _prod(dims) -> Any:
    out = 1
    for d in dims:
        out = out * d
    return out


def _ratio(a, b) -> Fraction | None:
    """a / b as a Fraction when it is a number, else None (symbolic)."""
    if isinstance(a, int) and isinstance(b, int):
        return Fraction(a, b)
    r = sympy.cancel(sympy.sympify(a) / sympy.sympify(b))
    if r.is_Rational:
        return Fraction(int(r.p), int(r.q))
    return None


def _integral(e) -> bool:
    """An int >= 1, or a symbolic size with no denominator."""
    if isinstance(e, int):
        return e >= 1
    e = sympy.cancel(sympy.sympify(e))
    if e.is_Number:
        return e.is_Integer and e >= 1
    return sympy.fraction(e)[1] == 1


def _dims_equal(a, b) -> bool:
    return a == b if isinstance(a, int) and isinstance(b, int) else _ratio(a, b) == 1


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _attr(n: Node, name: str, pos: int | None, default=None):
    if name in n.attrs:
        return n.attrs[name]
    if pos is not None and len(n.args) > pos:
        return n.args[pos]
    return default


def _tensor(v) -> bool:
    return isinstance(v, Value) and isinstance(v.type, TensorType)


def default_ranges(units: int, world: int) -> tuple | None:
    """`units` (heads, features, experts) over `world` ranks: an even split, or each unit
    on world / units consecutive ranks; None when neither divides the other."""
    if units >= world and units % world == 0:
        c = units // world
        return tuple((r * c, (r + 1) * c) for r in range(world))
    if 1 < units < world and world % units == 0:
        k = world // units
        return tuple((r // k, r // k + 1) for r in range(world))
    return None


def _tiles(ranges, size: int) -> bool:
    """The ranges split [0, size) into disjoint parts (a sum over ranks counts each once)."""
    return sorted(ranges) == sorted(set(ranges)) and \
        sum(hi - lo for lo, hi in ranges) == size and \
        all(a[1] == b[0] for a, b in zip(sorted(ranges), sorted(ranges)[1:])) and \
        min(lo for lo, _ in ranges) == 0


def _linear(n: Node, written: set):
    """(x, W, bias, transposed) of a linear layer with a weight input W: `mm(x, permute(W,
    [1, 0]))` / `addmm(bias, x, permute(W, [1, 0]))` (transposed, W [N, K]) or the same
    with W itself as [K, N]; else None."""
    if n.op == "aten.mm" and len(n.args) == 2:
        bias, (x, b) = None, n.args
    elif n.op == "aten.addmm" and len(n.args) == 3:
        bias, x, b = n.args
    else:
        return None
    if any(a != 1 for a in n.attrs.values()) or set(n.attrs) - {"beta", "alpha"}:
        return None
    if not (_tensor(x) and _tensor(b)) or x.type.rank != 2 or b.type.rank != 2:
        return None
    if bias is not None and not (_tensor(bias) and bias.type.rank == 1):
        return None

    def weight(w):
        return w.is_input and is_weight(w) and w not in written and w.type.rank == 2

    if weight(b):
        return x, b, bias, False
    p = b.producer
    if p is not None and p.op == "aten.permute" and list(p.attrs.get("dims", [])) == [1, 0] \
            and _tensor(p.args[0]) and weight(p.args[0]):
        return x, p.args[0], bias, True
    return None


# Ops that only relabel elements (the view trait, less what cuts or duplicates).
_RESHAPES = {"aten.reshape", "aten.view", "aten._unsafe_view"}
_PASS_THROUGH = {"aten.clone", "aten.alias", "aten.contiguous", "aten.lift_fresh_copy",
                 "aten.full_like", "aten.zeros_like", "aten.ones_like", "aten.empty_like"}
# Views a partial sum passes through (the sum over ranks commutes with them).
_PARTIAL_VIEWS = _RESHAPES | {"aten.permute", "aten.transpose", "aten.t", "aten.unsqueeze",
                              "aten.squeeze", "aten.alias"}
_REDUCTIONS = {"aten.mean": None, "aten.sum": None, "aten.amax": None, "aten.amin": None,
               "aten.prod": None, "aten.any": None, "aten.all": None, "aten.var_mean": None,
               "aten.argmax": None, "aten.argmin": None, "aten.max": None, "aten.min": None,
               "aten._softmax": -1, "aten._log_softmax": -1, "aten.softmax": -1,
               "aten.log_softmax": -1, "aten.topk": -1, "aten.sort": -1, "aten.argsort": -1,
               "aten.cumsum": -1}
_KEEPS_RANK = {"aten._softmax", "aten._log_softmax", "aten.softmax", "aten.log_softmax",
               "aten.topk", "aten.sort", "aten.argsort", "aten.cumsum"}
_NORMS = {"aten.rms_norm", "aten._fused_rms_norm", "aten.native_layer_norm"}
_SDPA = {"aten._scaled_dot_product_flash_attention_for_cpu", "aten.scaled_dot_product_attention",
         "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_efficient_attention",
         "aten._scaled_dot_product_cudnn_attention"}


class Analysis:
    """One round: the state of every value, and a plan for every node."""

    def __init__(self, g: Graph, world: int, dropped: set):
        self.g, self.world, self.dropped = g, world, dropped
        self.written = {v for n in g.nodes for v in written_values(n)}
        self.states: dict[Value, Any] = {}
        self.plans: dict[int, Plan] = {}
        self.roots: dict[int, Root] = {}
        self.failed: set[int] = set()          # id(linear node) of blamed candidates
        self.blamed: set[Root] = set()
        self.reasons: list[str] = []

    # ---- ranges ----
    def ranges(self, s: Shard) -> tuple:
        if s.fixed is not None:
            return s.fixed
        root = s.root
        if root.ranges is None:
            units = default_ranges(s.size, self.world)
            if units is None:
                raise ShardFail(f"{s.size} parts do not split over {self.world} ranks", s.blame)
            per = Fraction(1) / s.scale   # root features per element here
            rr = []
            for lo, hi in units:
                a, b = lo * per, hi * per
                if a.denominator != 1 or b.denominator != 1:
                    raise ShardFail("a split of whole parts is not one of whole features", s.blame)
                rr.append((int(a), int(b)))
            root.ranges = tuple(rr)
        out = []
        for lo, hi in root.ranges:
            a, b = lo * s.scale, hi * s.scale
            if a.denominator != 1 or b.denominator != 1:
                raise ShardFail(f"the split of {root.features} features is not one of "
                                f"{s.size} whole parts", s.blame)
            out.append((int(a), int(b)))
        return tuple(out)

    def same(self, a: Shard, b: Shard) -> bool:
        """Same dim, same split: without fixing an undecided split where both come from it."""
        if a.dim != b.dim or a.size != b.size or not _dims_equal(a.outer, b.outer):
            return False
        if a.fixed is None and b.fixed is None and a.root is b.root and a.scale == b.scale:
            return True
        return self.ranges(a) == self.ranges(b)

    def rescaled(self, s: Shard, dim: int, outer, factor: Fraction) -> Shard:
        """`s` seen as `factor` times as many elements along `dim` (a reshape)."""
        size = s.size * factor
        if size.denominator != 1:
            raise ShardFail("a reshape splits a part", s.blame)
        if s.fixed is not None:
            fixed = []
            for lo, hi in s.fixed:
                a, b = lo * factor, hi * factor
                if a.denominator != 1 or b.denominator != 1:
                    raise ShardFail("a reshape cuts across a rank's part", s.blame)
                fixed.append((int(a), int(b)))
            return replace(s, dim=dim, outer=make_dim(outer), size=int(size), fixed=tuple(fixed))
        if factor.denominator != 1:
            self.ranges(replace(s, size=int(size), scale=s.scale * factor))   # alignment
        return replace(s, dim=dim, outer=make_dim(outer), size=int(size), scale=s.scale * factor)

    def narrowed(self, s: Shard) -> Shard:
        """`s` with its ranges made concrete (what a replicated operand is sliced to)."""
        return Shard(s.dim, s.outer, s.size, fixed=self.ranges(s), blame=s.blame)

    # ---- the round ----
    def run(self) -> None:
        for v in self.g.inputs:
            self.states[v] = None
        for n in self.g.nodes:
            try:
                plan = self.plan(n)
            except ShardFail as e:
                blame = e.blame or self._blame_of(n)
                self.blamed |= blame
                self.failed |= {id(r.node) for r in blame}
                self.reasons.append(f"{n.op}: {e.why}")
                plan = Plan([None] * len(n.results))
                plan.needs = {v: None for v in n.operands()}
            self.plans[id(n)] = plan
            for r, s in zip(n.results, plan.results):
                self.states[r] = s
        for v in self.g.outputs:
            s = self.state(v)
            if isinstance(s, Shard):
                try:
                    self._check_gather(s)
                except ShardFail as e:
                    self.failed |= {id(r.node) for r in e.blame}
                    self.reasons.append(f"graph output: {e.why}")
        # Candidates whose split nothing fixed split evenly over their features.
        for root in self.roots.values():
            if root.ranges is None and id(root.node) not in self.failed:
                root.ranges = default_ranges(root.features, self.world)

    def _blame_of(self, n: Node) -> frozenset:
        return frozenset().union(*(s.blame for v in n.operands()
                                   if isinstance(s := self.states.get(v), Shard)))

    def _check_gather(self, s: Shard) -> None:
        if not _dims_equal(s.outer, 1):
            raise ShardFail("an output sharded inside a merged dim", s.blame)
        if len({hi - lo for lo, hi in self.ranges(s)}) != 1:
            raise ShardFail("an output whose parts differ in size (all_gather takes equal "
                            "parts)", s.blame)

    def state(self, v):
        """v's state; what a candidate blamed earlier in this round split reads as
        replicated, as it will be in the next round (fewer rounds, fewer knock-on
        failures)."""
        s = self.states.get(v) if isinstance(v, Value) else None
        if isinstance(s, Shard) and s.blame & self.blamed:
            return None
        return s

    # ---- rules ----
    def plan(self, n: Node) -> Plan:
        tensors = [v for v in n.operands() if _tensor(v)]
        states = {v: self.state(v) for v in tensors}
        lin = _linear(n, self.written)
        if lin is not None:
            return self._linear(n, lin, states)
        if not any(s is not None for s in states.values()):
            return Plan([None] * len(n.results))
        if all(s is None or s is PARTIAL for s in states.values()):
            if n.op in _PARTIAL_VIEWS and self._partial_view_ok(n):
                return Plan([PARTIAL], {tensors[0]: PARTIAL})
            if n.op == "sym.size":   # the sum's shape is the summands'
                return Plan([None], {tensors[0]: PARTIAL})
            return Plan([None] * len(n.results), {v: None for v in tensors})
        op = get_op(n.op)
        if n.op in _RESHAPES:
            return self._reshape(n, states)
        if op.has("elementwise") or n.op in _PASS_THROUGH:
            return self._elementwise(n, tensors, states)
        if n.op in _REDUCTIONS:
            return self._reduction(n, states)
        if n.op in _NORMS:
            return self._norm(n, states)
        if n.op in _SDPA:
            return self._attention(n, states)
        rule = getattr(self, "_" + n.op.replace(".", "_"), None)
        if rule is not None:
            return rule(n, states)
        raise ShardFail("no sharding rule for this op", self._blame_of(n))

    def _partial_view_ok(self, n: Node) -> bool:
        return n.op != "aten.squeeze" or _attr(n, "dim", None) is not None

    def _only(self, n: Node, states, v: Value) -> None:
        """Every sharded tensor operand of n is v."""
        for w, s in states.items():
            if w is not v and isinstance(s, Shard):
                raise ShardFail("more than one sharded operand", self._blame_of(n))

    def _linear(self, n: Node, lin, states) -> Plan:
        x, w, bias, transposed = lin
        sx = states[x]
        k_dim = 1
        if sx is None:
            features = w.type.shape[0] if transposed else w.type.shape[1]
            if id(n) in self.dropped or not isinstance(features, int) or features % self.world:
                return Plan([None])
            root = self.roots.setdefault(id(n), Root(n, features))
            s = Shard(1, 1, features, root, Fraction(1), blame=frozenset({root}))
            return Plan([s], {x: None}, kind="column", info={"lin": lin, "shard": s})
        if sx is PARTIAL:
            return Plan([None], {x: None})
        if sx.dim == k_dim and _dims_equal(sx.outer, 1):
            ranges = self.ranges(sx)
            if not _tiles(ranges, sx.size):
                raise ShardFail("the contraction's parts overlap (a sum would count some twice)",
                                sx.blame)
            return Plan([PARTIAL if bias is None else None], {x: sx}, kind="row",
                        info={"lin": lin, "shard": sx})
        raise ShardFail("a linear layer's input is split along its tokens", sx.blame)

    def _elementwise(self, n: Node, tensors, states) -> Plan:
        out = n.results[0].type
        if len(n.results) != 1 or not isinstance(out, TensorType):
            raise ShardFail("an elementwise op with several results", self._blame_of(n))
        joined = None
        needs = {}
        for v in tensors:
            s = states[v]
            if s is PARTIAL:
                needs[v] = None
            elif isinstance(s, Shard):
                rd = s.dim + out.rank - v.type.rank
                mine = s.moved(rd)
                if joined is None:
                    joined = mine
                elif not self.same(joined, mine):
                    raise ShardFail("operands split differently", joined.blame | s.blame)
                else:
                    joined = replace(joined, blame=joined.blame | s.blame)
                needs[v] = s
        for v in tensors:
            if states[v] is None or states[v] is PARTIAL:
                od = joined.dim - (out.rank - v.type.rank)
                if od >= 0 and v.type.shape[od] != 1:
                    needs[v] = self._narrow_need(joined.moved(od))
                else:
                    needs[v] = None
        return Plan([joined], needs)

    def _narrow_need(self, s: Shard) -> Shard:
        return self.narrowed(s)

    def _reshape(self, n: Node, states) -> Plan:
        x = n.args[0]
        s = states[x]
        if not isinstance(s, Shard):
            raise AssertionError(n.op)
        key = "shape" if "shape" in n.attrs else ("size" if "size" in n.attrs else None)
        shape = n.attrs[key] if key else (n.args[1] if len(n.args) > 1 else None)
        if not isinstance(shape, (list, tuple)):
            raise ShardFail("a reshape whose shape is not a list", s.blame)
        ins, outs = list(x.type.shape), list(n.results[0].type.shape)
        # The split part, in the flat order of elements: strides [st, top).
        st = _prod(ins[s.dim + 1:])
        top = st * s.size
        out_s = None
        for j in range(len(outs)):
            ost = _prod(outs[j + 1:])
            r = _ratio(top, ost)
            if r is None or r <= 1:
                continue
            if isinstance(outs[j], int) and isinstance(ost, int) and isinstance(top, int):
                outer = Fraction(outs[j] * ost, top)
                if outer.denominator != 1 or outer < 1:
                    continue
                outer = int(outer)
            else:
                outer = sympy.cancel(outs[j] * ost / sympy.sympify(top))
                if not _integral(outer):
                    continue
            inner = _ratio(st, ost)
            if inner is not None and inner.denominator == 1:
                out_s = self.rescaled(s, j, outer, inner)       # the part inside dim j
            else:
                sub = _ratio(ost, st)
                if sub is None or sub.denominator != 1:
                    break
                out_s = self.rescaled(s, j, outer, 1 / sub)     # dim j and whole lower dims
            break
        if out_s is None:
            raise ShardFail("a reshape moves the split part across dims", s.blame)
        j = out_s.dim
        if -1 in shape and shape[j] != -1 and not isinstance(out_s.outer, int):
            raise ShardFail("a reshape with a -1 and a symbolic split dim", s.blame)
        return Plan([out_s], {x: s}, info={"shape_key": key, "shape_dim": j})

    def _reduction(self, n: Node, states) -> Plan:
        x = n.args[0]
        s = states[x]
        self._only(n, states, x)
        if not isinstance(s, Shard):
            raise AssertionError(n.op)
        rank = x.type.rank
        default = _REDUCTIONS[n.op]
        dims = _attr(n, "dim", 1, default)
        if dims is None or dims == []:
            raise ShardFail("a reduction over every dim", s.blame)
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [_norm_dim(d, rank) for d in dims]
        if s.dim in dims:
            raise ShardFail("a reduction over the split dim", s.blame)
        keep = n.op in _KEEPS_RANK or bool(_attr(n, "keepdim", None, False))
        d = s.dim if keep else s.dim - sum(1 for r in dims if r < s.dim)
        results = []
        for r in n.results:
            results.append(s.moved(d) if _tensor(r) and r.type.rank > d else None)
        return Plan(results, {x: s})

    def _norm(self, n: Node, states) -> Plan:
        x = n.args[0]
        s = states[x]
        self._only(n, states, x)
        shape = _attr(n, "normalized_shape", 1)
        if not isinstance(s, Shard) or not isinstance(shape, (list, tuple)) or \
                s.dim >= x.type.rank - len(shape):
            raise ShardFail("a norm over the split dim", self._blame_of(n))
        return Plan([s if _tensor(r) and r.type.rank > s.dim else None for r in n.results],
                    {x: s, **{v: None for v in states if v is not x}})

    def _attention(self, n: Node, states) -> Plan:
        q, k, v = n.args[:3]
        sq = states.get(q)
        if not isinstance(sq, Shard) or sq.dim != 1 or not _dims_equal(sq.outer, 1):
            raise ShardFail("attention whose queries are not split by head", self._blame_of(n))
        hq, hkv = q.type.shape[1], k.type.shape[1]
        if not isinstance(hkv, int) or v.type.shape[1] != hkv or hq % hkv:
            raise ShardFail("attention heads of unknown grouping", self._blame_of(n))
        g = hq // hkv
        q_ranges = self.ranges(sq)
        kv_ranges = tuple((lo // g, -(-hi // g)) for lo, hi in q_ranges)
        for (qlo, qhi), (klo, khi) in zip(q_ranges, kv_ranges):
            nq, nk = qhi - qlo, khi - klo
            if nq % nk or any((qlo + i) // g - klo != i // (nq // nk) for i in range(nq)):
                raise ShardFail("a rank's query heads do not group over its KV heads",
                                self._blame_of(n))
        kv_state = Shard(1, 1, hkv, fixed=kv_ranges, blame=sq.blame)
        needs = {q: sq}
        for t in (k, v):
            st = states.get(t)
            if st is PARTIAL:
                raise ShardFail("partial keys or values", sq.blame)
            needs[t] = self._kv_need(st, kv_state, sq.blame)
        mask = _attr(n, "attn_mask", 3) if n.op == "aten.scaled_dot_product_attention" \
            else n.attrs.get("attn_mask", n.attrs.get("attn_bias"))
        for m in ([mask] if _tensor(mask) else []):
            sm = states.get(m)
            if m.type.rank == 4 and m.type.shape[1] != 1:
                want = Shard(1, 1, hq, fixed=q_ranges, blame=sq.blame)
                if sm is None:
                    needs[m] = want
                elif not (isinstance(sm, Shard) and self.same(sm, want)):
                    raise ShardFail("an attention mask split unlike the queries",
                                    sm.blame if isinstance(sm, Shard) else sq.blame)
                else:
                    needs[m] = sm
            elif isinstance(sm, Shard):
                raise ShardFail("an attention mask split along no head", sm.blame)
        results = []
        for i, r in enumerate(n.results):
            if i == 0:
                results.append(sq)
            elif self._users_of(r):
                raise ShardFail("an attention side result is read", sq.blame)
            else:
                results.append(sq if _tensor(r) and r.type.rank >= 2 and r.type.shape[1] == hq
                               else None)
        return Plan(results, needs)

    def _kv_need(self, st, want: Shard, blame) -> Shard:
        """What keys or values must be on a rank: `want`'s heads, sliced from what it has."""
        if st is None:
            return want
        # Failures blame the keys' or values' split: replicated, they can always be sliced.
        if st.dim != 1 or not _dims_equal(st.outer, 1) or st.size != want.size:
            raise ShardFail("keys or values split along another dim", st.blame)
        have = self.ranges(st)
        if have == want.fixed:
            return st
        if all(hl <= wl and wh <= hh for (hl, hh), (wl, wh) in zip(have, want.fixed)):
            return replace(want, blame=want.blame | st.blame)   # narrowed from a superset
        raise ShardFail("a rank lacks KV heads its query heads read", st.blame)

    def _users_of(self, r: Value) -> bool:
        if not hasattr(self, "_users"):
            self._users = {v for n in self.g.nodes for v in n.operands()} | set(self.g.outputs)
        return r in self._users

    # -- views and layout --
    def _aten_permute(self, n: Node, states) -> Plan:
        x, s = n.args[0], states[n.args[0]]
        dims = [_norm_dim(d, x.type.rank) for d in n.attrs.get("dims", n.args[1] if len(n.args) > 1 else [])]
        return Plan([s.moved(dims.index(s.dim))], {x: s})

    def _aten_transpose(self, n: Node, states) -> Plan:
        x, s = n.args[0], states[n.args[0]]
        a = _norm_dim(_attr(n, "dim0", 1), x.type.rank)
        b = _norm_dim(_attr(n, "dim1", 2), x.type.rank)
        d = b if s.dim == a else a if s.dim == b else s.dim
        return Plan([s.moved(d)], {x: s})

    def _aten_t(self, n: Node, states) -> Plan:
        x, s = n.args[0], states[n.args[0]]
        return Plan([s.moved(1 - s.dim if x.type.rank == 2 else s.dim)], {x: s})

    def _aten_unsqueeze(self, n: Node, states) -> Plan:
        x, s = n.args[0], states[n.args[0]]
        d = _norm_dim(_attr(n, "dim", 1), x.type.rank + 1)
        return Plan([s.moved(s.dim + 1 if d <= s.dim else s.dim)], {x: s})

    def _aten_squeeze(self, n: Node, states) -> Plan:
        x, s = n.args[0], states[n.args[0]]
        dims = _attr(n, "dim", 1)
        if dims is None:
            raise ShardFail("a squeeze of every unit dim (a rank's part may be one)", s.blame)
        dims = [_norm_dim(d, x.type.rank) for d in ([dims] if isinstance(dims, int) else dims)]
        dims = [d for d in dims if x.type.shape[d] == 1]
        if s.dim in dims:
            raise AssertionError("a split dim of size 1")
        return Plan([s.moved(s.dim - sum(1 for d in dims if d < s.dim))], {x: s})

    def _aten_expand(self, n: Node, states) -> Plan:
        x, s = n.args[0], states[n.args[0]]
        size = list(_attr(n, "size", 1))
        d = s.dim + len(size) - x.type.rank
        if not _dims_equal(n.results[0].type.shape[d], x.type.shape[s.dim]):
            raise AssertionError("expand of a split dim")
        size[d] = -1
        attrs = dict(n.attrs)
        if "size" not in attrs:
            raise ShardFail("an expand with a positional size", s.blame)
        attrs["size"] = size
        return Plan([s.moved(d)], {x: s}, attrs)

    def _aten_slice(self, n: Node, states) -> Plan:
        x, s = n.args[0], states[n.args[0]]
        if _norm_dim(_attr(n, "dim", 1, 0), x.type.rank) == s.dim:
            raise ShardFail("a slice of the split dim", s.blame)
        return Plan([s], {x: s})

    def _aten_select(self, n: Node, states) -> Plan:
        x, s = n.args[0], states[n.args[0]]
        d = _norm_dim(_attr(n, "dim", 1), x.type.rank)
        if d == s.dim:
            raise ShardFail("a select on the split dim", s.blame)
        return Plan([s.moved(s.dim - (1 if d < s.dim else 0))], {x: s})

    def _split(self, n: Node, states, default_dim=0, drops_dim=False) -> Plan:
        x, s = n.args[0], states[n.args[0]]
        self._only(n, states, x)
        d = _norm_dim(_attr(n, "dim", None, default_dim), x.type.rank)
        if d == s.dim:
            raise ShardFail("a split of the split dim", s.blame)
        nd = s.dim - (1 if drops_dim and d < s.dim else 0)
        return Plan([s.moved(nd) for _ in n.results], {x: s})

    _aten_split_with_sizes = _split
    _aten_split = _split
    _aten_chunk = _split

    def _aten_unbind(self, n, states):
        return self._split(n, states, drops_dim=True)

    def _aten_cat(self, n: Node, states) -> Plan:
        parts = [t for t in n.args[0] if _tensor(t)]
        rank = n.results[0].type.rank
        d = _norm_dim(n.attrs.get("dim", 0), rank)
        joined, needs = None, {}
        for t in parts:
            st = states.get(t)
            if isinstance(st, Shard):
                if joined is not None and not self.same(joined, st):
                    raise ShardFail("a cat of parts split differently", joined.blame | st.blame)
                joined = st if joined is None else replace(joined, blame=joined.blame | st.blame)
                needs[t] = st
        if joined.dim == d:
            raise ShardFail("a cat along the split dim", joined.blame)
        for t in parts:
            if states.get(t) is None or states.get(t) is PARTIAL:
                if t.type.rank != rank:
                    raise ShardFail("a cat of tensors of different ranks", joined.blame)
                needs[t] = self._narrow_need(joined)
        return Plan([joined], needs)

    # -- cache writes and indexing --
    def _index_dims(self, target: Value, indices) -> tuple[list[int], int] | None:
        """Indexed dims of `target` (adjacent) and the rank of the broadcast index."""
        idx = [i for i, t in enumerate(indices) if t is not None]
        if not idx or idx != list(range(idx[0], idx[-1] + 1)):
            return None
        ranks = [indices[i].type.rank for i in idx]
        return idx, max(ranks)

    def _value_dim(self, d: int, idx: list[int], irank: int) -> int:
        """Where target dim d (not indexed) sits in the indexed-result shape."""
        return d if d < idx[0] else d - len(idx) + irank

    def _index_put(self, n: Node, states) -> Plan:
        target, indices, values = n.args[0], n.args[1], n.args[2]
        st, sv = states.get(target), states.get(values)
        for t in indices:
            if _tensor(t) and states.get(t) is not None:
                raise ShardFail("a sharded index", self._blame_of(n))
        found = self._index_dims(target, indices)
        if found is None:
            raise ShardFail("indices on dims that are not adjacent", self._blame_of(n))
        idx, irank = found
        vrank = target.type.rank - len(idx) + irank
        if sv is PARTIAL:
            sv = None
        if isinstance(st, Shard):
            if st.dim in idx:
                raise ShardFail("a write indexed along the split dim", st.blame)
            vd = self._value_dim(st.dim, idx, irank) - (vrank - values.type.rank)
            want = st.moved(vd)
            if sv is None:
                need_v = self._narrow_need(want) if vd >= 0 and values.type.shape[vd] != 1 else None
            elif not self.same(want, sv):
                raise ShardFail("a write of values split unlike their target", st.blame | sv.blame)
            else:
                need_v = sv
            return Plan([st], {target: st, values: need_v, **self._r(indices)})
        # a replicated target written with split values: the rank writes its part, through
        # a slice of the target (a view: the write lands in the caller's tensor)
        vd = sv.dim + (vrank - values.type.rank)
        td = vd if vd < idx[0] else vd + len(idx) - irank
        if idx[0] <= vd < idx[0] + irank:
            raise ShardFail("values split along the index dims", sv.blame)
        want = self._narrow_need(sv.moved(td))
        return Plan([want], {target: want, values: sv, **self._r(indices)})

    def _r(self, values) -> dict:
        return {t: None for t in values if _tensor(t)}

    _aten_index_put = _index_put
    _aten_index_put_ = _index_put

    def _index_copy(self, n: Node, states) -> Plan:
        target, index, source = n.args[0], _attr(n, "index", 2), _attr(n, "source", 3)
        d = _norm_dim(_attr(n, "dim", 1), target.type.rank)
        return self._same_shape_write(n, states, target, source, [d], [index])

    _aten_index_copy = _index_copy
    _aten_index_copy_ = _index_copy

    def _aten_copy_(self, n: Node, states) -> Plan:
        return self._same_shape_write(n, states, n.args[0], n.args[1], [], [])

    _aten_copy = _aten_copy_

    def _same_shape_write(self, n, states, target, source, banned, extra) -> Plan:
        st, ss = states.get(target), states.get(source)
        if ss is PARTIAL:
            ss = None
        for t in extra:
            if _tensor(t) and states.get(t) is not None:
                raise ShardFail("a sharded index", self._blame_of(n))
        if isinstance(st, Shard):
            if st.dim in banned:
                raise ShardFail("a write along the split dim", st.blame)
            sd = st.dim - (target.type.rank - source.type.rank)
            want = st.moved(sd)
            if ss is None:
                need = self._narrow_need(want) if sd >= 0 and source.type.shape[sd] != 1 else None
            elif not self.same(want, ss):
                raise ShardFail("a write of values split unlike their target", st.blame | ss.blame)
            else:
                need = ss
            return Plan([st], {target: st, source: need, **self._r(extra)})
        td = ss.dim + (target.type.rank - source.type.rank)
        if td in banned:
            raise ShardFail("a write along the split dim", ss.blame)
        want = self._narrow_need(ss.moved(td))
        return Plan([want], {target: want, source: ss, **self._r(extra)})

    def _aten_index(self, n: Node, states) -> Plan:
        x, indices = n.args[0], n.args[1]
        s = states.get(x)
        if not isinstance(s, Shard) or any(_tensor(t) and states.get(t) is not None for t in indices):
            raise ShardFail("an index by sharded indices", self._blame_of(n))
        found = self._index_dims(x, list(indices) + [None] * (x.type.rank - len(indices)))
        if found is None or s.dim in found[0]:
            raise ShardFail("an index along the split dim", s.blame)
        idx, irank = found
        return Plan([s.moved(self._value_dim(s.dim, idx, irank))], {x: s, **self._r(indices)})

    def _mm_like(self, n: Node, states, labels) -> Plan:
        """A contraction written with dim labels per operand, e.g. mm: ("mk", "kn", "mn")."""
        a, b = n.args[0], n.args[1]
        la, lb, lo = labels
        split = {}
        for t, lab in ((a, la), (b, lb)):
            s = states.get(t)
            if isinstance(s, Shard):
                if lab[s.dim] in split and not self.same(split[lab[s.dim]][1].moved(0), s.moved(0)):
                    raise ShardFail("operands split differently", self._blame_of(n))
                split.setdefault(lab[s.dim], (t, s))
        if len(split) != 1:
            # Heads split along the batch of a bmm (hand-written attention) win: the other
            # operand's split (a head's features) is what stays replicated.
            others = [st for lab, (_, st) in split.items() if lab != "b"] if "b" in split else []
            raise ShardFail("a contraction split along several dims",
                            frozenset().union(*(st.blame for st in others)) or self._blame_of(n))
        (label, (_, s)), = split.items()
        needs = {}
        for t, lab in ((a, la), (b, lb)):
            st = states.get(t)
            if isinstance(st, Shard):
                needs[t] = st
            elif label in lab and t.type.shape[lab.index(label)] != 1:
                needs[t] = self._narrow_need(s.moved(lab.index(label)))
            else:
                needs[t] = None
        if label in lo:
            return Plan([s.moved(lo.index(label))], needs)
        ranges = self.ranges(s)
        if not _tiles(ranges, s.size) or not _dims_equal(s.outer, 1):
            raise ShardFail("the contraction's parts overlap", s.blame)
        return Plan([PARTIAL], needs)

    def _aten_mm(self, n, states):
        return self._mm_like(n, states, ("mk", "kn", "mn"))

    def _aten_bmm(self, n, states):
        return self._mm_like(n, states, ("bmk", "bkn", "bmn"))

    def _sym_size(self, n: Node, states) -> Plan:
        x, s = n.args[0], states[n.args[0]]
        if _norm_dim(n.attrs["dim"], x.type.rank) == s.dim:
            raise ShardFail("the size of the split dim is read", s.blame)
        return Plan([None], {x: s})


# ---------------------------------------------------------------- the rewrite


class Rewriter:
    """Rewrites the graph in place into rank `rank`'s share, after a clean round."""

    def __init__(self, g: Graph, ana: Analysis, rank: int):
        self.g, self.ana, self.rank, self.world = g, ana, rank, ana.world
        self.prologue: list[Node] = []      # slices of inputs and weights
        self.out: list[Node] = []
        self.narrowed: dict = {}
        self.reduced: dict[Value, Value] = {}
        self.weights: dict = {}
        self.collectives = 0
        self.sharded_linears = 0

    def _emit(self, op: str, args: list, attrs: dict, into: list | None = None) -> Value:
        node = Node(op, args, attrs, infer_types(op, args, attrs, self.g))
        (self.out if into is None else into).append(node)
        return node.results[0]

    def local_range(self, s: Shard) -> tuple[int, int]:
        return self.ana.ranges(s)[self.rank]

    def local_type(self, v: Value, s) -> TensorType:
        if not isinstance(s, Shard):
            return v.type
        lo, hi = self.local_range(s)
        shape = list(v.type.shape)
        shape[s.dim] = make_dim(sympy.sympify(s.outer) * (hi - lo)) if not isinstance(s.outer, int) \
            else s.outer * (hi - lo)
        return TensorType(v.type.dtype, tuple(shape))

    def get(self, v: Value, need) -> Value:
        """v as operand `need` wants it on this rank."""
        s = self.ana.state(v)
        if need is PARTIAL:
            return v
        if s is PARTIAL:
            v, s = self.reduce(v), None
        if s is None:   # a replicated value, or sliced to the rank's part
            return v if need is None else self.narrow(v, need)
        if need is None:
            raise AssertionError("a sharded value where a replicated one is needed")
        if self.ana.ranges(s) == self.ana.ranges(need):
            return v
        # A superset (KV heads several ranks hold): its part. Decided on every rank's
        # ranges, not this one's, so that all ranks build the same graph.
        have, want = self.local_range(s), self.local_range(need)
        key = (v, want)
        if key not in self.narrowed:
            self.narrowed[key] = self._emit("aten.slice", [v], {"dim": s.dim, "start": want[0] - have[0],
                                                               "end": want[1] - have[0]})
        return self.narrowed[key]

    def narrow(self, v: Value, need: Shard) -> Value:
        """A replicated v's part on this rank: a slice (a view, which for a cache input is
        where the rank's writes land), or inside a merged dim ([B * H, ...] of hand-written
        attention) a reshape that splits the dim, the slice, and a reshape back."""
        lo, hi = self.local_range(need)
        key = (v, need.dim, need.outer, lo, hi)
        if key in self.narrowed:
            return self.narrowed[key]
        into = self.prologue if v.is_input else None
        d = need.dim
        if _dims_equal(need.outer, 1):
            out = self._emit("aten.slice", [v], {"dim": d, "start": lo, "end": hi}, into)
        else:
            sizes = [x if isinstance(x, int) else self._emit("sym.size", [v], {"dim": i}, into)
                     for i, x in enumerate(v.type.shape)]
            outer = need.outer if isinstance(need.outer, int) else \
                self._emit("sym.floordiv", [sizes[d], need.size], {}, into)
            split = self._emit("aten.reshape", [v], {"shape": sizes[:d] + [outer, need.size]
                                                     + sizes[d + 1:]}, into)
            part = self._emit("aten.slice", [split], {"dim": d + 1, "start": lo, "end": hi}, into)
            merged = outer * (hi - lo) if isinstance(outer, int) else \
                self._emit("sym.mul", [outer, hi - lo], {}, into)
            out = self._emit("aten.reshape", [part], {"shape": sizes[:d] + [merged] + sizes[d + 1:]},
                             into)
        self.narrowed[key] = out
        return out

    def reduce(self, v: Value) -> Value:
        if v not in self.reduced:
            self.reduced[v] = self._emit("kiln.all_reduce", [v], {"world_size": self.world})
            self.collectives += 1
        return self.reduced[v]

    def weight_slice(self, w: Value, dim: int, lo: int, hi: int, contiguous: bool) -> Value:
        key = (w, dim, lo, hi, contiguous)
        if key not in self.weights:
            x = self._emit("aten.slice", [w], {"dim": dim, "start": lo, "end": hi}, self.prologue)
            if contiguous:
                x = self._emit("aten.contiguous", [x], {}, self.prologue)
            self.weights[key] = x
        return self.weights[key]

    def run(self) -> None:
        for n in self.g.nodes:
            plan = self.ana.plans[id(n)]
            if plan.kind == "column":
                self._column(n, plan)
            elif plan.kind == "row":
                self._row(n, plan)
            else:
                self._generic(n, plan)
        outputs = []
        for v in self.g.outputs:
            s = self.ana.state(v)
            if s is PARTIAL:
                v = self.reduce(v)
            elif isinstance(s, Shard):
                v = self.gather(v, s)
            outputs.append(v)
        self.g.nodes = self.prologue + self.out
        self.g.outputs = outputs

    def _generic(self, n: Node, plan: Plan) -> None:
        if all(s is None for s in plan.results) and all(
                self.ana.state(v) is None for v in n.operands()):
            self.out.append(n)
            return

        def local(v):
            if not _tensor(v):
                return v
            state = self.ana.state(v)
            return self.get(v, plan.needs.get(v, None if state is PARTIAL else state))
        n.args = map_values(n.args, local)
        n.attrs = {k: map_values(a, local) for k, a in
                   (plan.attrs if plan.attrs is not None else n.attrs).items()}
        if all(s is None for s in plan.results):
            self.out.append(n)   # replicated results: only operands were made whole
            return
        if "shape_dim" in plan.info:
            self._local_shape(n, plan)
        expected = [self.local_type(r, s) for r, s in zip(n.results, plan.results)]
        got = infer_types(n.op, n.args, n.attrs, self.g)
        if got != expected:
            raise AssertionError(f"shard.tensor_parallel: {n.op} on rank {self.rank} gives "
                                 f"{got}, the analysis expected {expected}")
        for r, t in zip(n.results, expected):
            r.type = t
        self.out.append(n)

    def _local_shape(self, n: Node, plan: Plan) -> None:
        """A reshape's split entry: -1 (inferred), or the local size when there is a -1."""
        s, j, key = plan.results[0], plan.info["shape_dim"], plan.info["shape_key"]
        shape = list(n.attrs[key] if key else n.args[1])
        if -1 not in shape:
            shape[j] = -1
        elif shape[j] != -1:
            lo, hi = self.local_range(s)
            shape[j] = s.outer * (hi - lo)
        if key:
            n.attrs[key] = shape
        else:
            n.args = [n.args[0], shape] + list(n.args[2:])

    def _column(self, n: Node, plan: Plan) -> None:
        x, w, bias, transposed = plan.info["lin"]
        lo, hi = self.local_range(plan.info["shard"])
        if transposed:
            b = self._emit("aten.permute", [self.weight_slice(w, 0, lo, hi, False)], {"dims": [1, 0]},
                           self.prologue)
        else:
            b = self.weight_slice(w, 1, lo, hi, True)
        if bias is None:
            n.args = [x, b]
        else:
            n.args = [self.narrow_bias(bias, lo, hi), x, b]
        n.results[0].type = self.local_type(n.results[0], plan.results[0])
        self.sharded_linears += 1
        self.out.append(n)

    def narrow_bias(self, bias: Value, lo: int, hi: int) -> Value:
        if bias.is_input:
            return self.weight_slice(bias, 0, lo, hi, False)
        return self._emit("aten.slice", [bias], {"dim": 0, "start": lo, "end": hi})

    def _row(self, n: Node, plan: Plan) -> None:
        x, w, bias, transposed = plan.info["lin"]
        lo, hi = self.local_range(plan.info["shard"])
        if transposed:
            b = self._emit("aten.permute", [self.weight_slice(w, 1, lo, hi, True)], {"dims": [1, 0]},
                           self.prologue)
        else:
            b = self.weight_slice(w, 0, lo, hi, False)
        self.sharded_linears += 1
        if bias is None:
            n.args = [x, b]
            self.out.append(n)   # a partial sum, reduced where it is needed whole
            return
        partial = self._emit("aten.mm", [x, b], {})
        whole = self._emit("kiln.all_reduce", [partial], {"world_size": self.world})
        self.collectives += 1
        n.op, n.args, n.attrs = "aten.add", [whole, bias], {}
        self.out.append(n)

    def gather(self, v: Value, s: Shard) -> Value:
        ranges = self.ana.ranges(s)
        rank = v.type.rank
        g = self._emit("kiln.all_gather", [v], {"dim": s.dim - rank, "world_size": self.world})
        self.collectives += 1
        part = ranges[0][1] - ranges[0][0]
        if ranges == tuple((r * part, (r + 1) * part) for r in range(self.world)):
            return g
        # ranks' parts overlap: take each element from the first rank that holds it
        pieces, pos = [], 0
        while pos < s.size:
            r = next(r for r, (lo, hi) in enumerate(ranges) if lo <= pos < hi)
            lo, hi = ranges[r]
            pieces.append(self._emit("aten.slice", [g], {"dim": s.dim, "start": r * part + pos - lo,
                                                        "end": r * part + hi - lo}))
            pos = hi
        return pieces[0] if len(pieces) == 1 else self._emit("aten.cat", [pieces], {"dim": s.dim})


def _options(ctx: PassContext) -> tuple[int, int] | None:
    size = ctx.options.get("tensor_parallel_size") or 1
    if size <= 1:
        return None
    rank = ctx.options.get("tensor_parallel_rank")
    if rank is None:
        raise ValueError(f"shard: tensor_parallel_size={size} but no tensor_parallel_rank in the "
                         f"pass options (the compiler resolves it from the process group; pass "
                         f"it when running the pass manager by hand)")
    return size, rank


@register_pass("shard.tensor_parallel", "with tensor_parallel_size N > 1: this rank's share of "
               "the graph (column/row-parallel linears, heads split, KV-cache inputs sliced), "
               "kiln.all_reduce / kiln.all_gather where whole values are needed")
def tensor_parallel(g: Graph, ctx: PassContext) -> int:
    opts = _options(ctx)
    if opts is None:
        return 0
    world, rank = opts
    if "tensor_parallel" in g.meta:
        return 0   # already this rank's share
    dropped: set[int] = set()
    for i in range(MAX_ROUNDS):
        ana = Analysis(g, world, dropped)
        ana.run()
        if not ana.failed:
            break
        log.debug("shard.tensor_parallel round %d: %d candidate(s) stay replicated: %s", i,
                  len(ana.failed - dropped), "; ".join(sorted(set(ana.reasons))))
        dropped |= ana.failed
    else:
        ctx.note(f"the sharding analysis did not settle in {MAX_ROUNDS} rounds; nothing sharded")
        return 0
    if not any(id(r.node) not in dropped for r in ana.roots.values()):
        ctx.note(f"nothing sharded over {world} ranks: no linear layer's output features split "
                 f"so that every use of them is proven (everything stays replicated)")
        return 0
    if not ctx.allow():
        return 0
    rw = Rewriter(g, ana, rank)
    try:
        rw.run()
    except AssertionError as e:   # the analysis and the rewrite disagree: a kiln bug
        raise RuntimeError(f"shard.tensor_parallel could not shard @{g.name} ({e}); compile "
                           f"without it (KILN_DISABLE_PASSES=shard.tensor_parallel: every rank "
                           f"computes the whole model) and report the graph "
                           f"(KILN_DUMP_DIR)") from None
    dce(g)
    g.meta["tensor_parallel"] = {"size": world, "rank": rank}
    return rw.sharded_linears + rw.collectives


def shard_experts(g: Graph, ctx: PassContext) -> int:
    """Expert parallelism on `kiln.fused_moe` (after fuse.moe): this rank's E / N experts,
    routing over all E, an all_reduce of the ranks' sums, placed after the views that
    only reshape the sum (so fuse.collective finds it beside the residual add). x and the
    router logits are replicated there: shard.tensor_parallel splits feature dims only,
    and a fused_moe's x has the full hidden size of its expert weights."""
    opts = _options(ctx)
    if opts is None:
        return 0
    world, rank = opts
    written = {v for n in g.nodes for v in written_values(n)}
    users = g.users()
    outputs = set(g.outputs)
    prologue: list[Node] = []
    after: dict[int, Node] = {}      # id(node) -> the all_reduce that follows it
    for n in g.nodes:
        if n.op != "kiln.fused_moe" or n.attrs.get("expert_start", 0):
            continue
        x, logits, wgu, wd = n.args
        experts = wgu.type.shape[0]
        if not all(w.is_input and is_weight(w) and w not in written for w in (wgu, wd)) \
                or logits.type.shape[1] != experts or experts % world or not ctx.allow():
            continue
        lo, hi = rank * experts // world, (rank + 1) * experts // world
        args = [x, logits]
        for w in (wgu, wd):
            attrs = {"dim": 0, "start": lo, "end": hi}
            node = Node("aten.slice", [w], attrs, infer_types("aten.slice", [w], attrs, g))
            prologue.append(node)
            args.append(node.results[0])
        n.args = args
        if lo:
            n.attrs = {**n.attrs, "expert_start": lo}
        last = n
        while len(us := users.get(last.results[0], [])) == 1 and last.results[0] not in outputs \
                and us[0].op in _PARTIAL_VIEWS and len(us[0].results) == 1:
            last = us[0]
        v = last.results[0]
        total = Node("kiln.all_reduce", [v], {"world_size": world}, [v.type])
        for u in users.get(v, []):
            u.replace_uses({v: total.results[0]})
        g.outputs = [total.results[0] if o is v else o for o in g.outputs]
        after[id(last)] = total
    if not after:
        return 0
    nodes = list(prologue)
    for n in g.nodes:
        nodes.append(n)
        if id(n) in after:
            nodes.append(after[id(n)])
    g.nodes = nodes
    return len(after)
