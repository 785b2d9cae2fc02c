"""fuse.moe: the MoE block as transformers 5 writes it -> one `kiln.fused_moe` per layer.

Written with the Python pattern API because the capture has parts a rule cannot say: an
opaque custom op whose name only exists once transformers is imported, and a
`torch.arange` that CSE shares between layers (it is an input of the pattern, checked by
a Python constraint, not a statement). The matcher and rewriter are the rules' own.

What transformers 5.23's `grouped_mm_experts_forward` (Mixtral, Qwen3-MoE) captures to,
after canonicalize and fuse.activation:

    router softmax (float32) -> topk -> [sum, div: renormalize] -> reshape(-1) -> sort
    tokens  = perm // top_k;  xs = x[tokens];  ws = weights.flatten()[perm]
    offsets = cumsum(histc(sorted_ids.float(), bins=E, max=E-1), dtype=int32)
    h = grouped_mm(xs, w_gate_up^T, offsets); gate, up = split(h); a = silu_mul(gate, up)
    y = grouped_mm(a, w_down^T, offsets) * ws[:, None]
    inv = empty_like(perm); inv[perm] = arange; out = y[inv].view(T, k, H).sum(1)

Two things vary, each declared as data in `FORMS` (one pattern per form, built by the one
function below):

- `grouped_mm` is `transformers::grouped_mm_fallback` or `aten._grouped_mm`
  (`torch.nn.functional.grouped_mm`). transformers' `_can_use_grouped_mm` picks the torch op
  unless dynamo traces a dtype other than bf16, or the weights sit on a CPU with torch <=
  2.8 (<= 2.10 when misaligned), or on a CUDA GPU older than SM80: so bf16 on a GPU (and
  on CPU with torch > 2.10) captures `aten._grouped_mm`, fp32 the custom op.
- the sentinel mask of expert parallelism: transformers 5.17 always (5.23 only when the
  experts are expert-parallel) adds `mask = (sorted_ids >= E)[:, None]` and zeroes the
  masked rows of the first GEMM's input and of both GEMMs' outputs
  (`masked_fill(mask, 0.0)`, captured as `where(mask, scalar_tensor(0.0), v)`). top-k ids
  lie in [0, E), so the mask is all false and the `where`s are the identity.

The histc input is a float cast of the sorted ids on CPU and an int32 cast on CUDA; the
pattern's `cast` takes either.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.ir import REGISTRY, Graph, TensorType, Value

from .pattern import Const, Match, Pattern, PatternBuilder, dims_equal

FALLBACK = "torch.transformers.grouped_mm_fallback.default"


@dataclass(frozen=True)
class MoeForm:
    """One way the grouped_mm experts forward reaches kiln (see the module docstring)."""
    grouped_mm: str           # the op of both expert GEMMs
    sentinel_mask: bool       # where(sorted_ids >= E, 0, .) around the GEMMs

    @property
    def name(self) -> str:
        short = "fallback" if self.grouped_mm == FALLBACK else "aten"
        return f"moe_grouped_mm_{short}" + ("_masked" if self.sentinel_mask else "")


FORMS = (
    MoeForm(FALLBACK, sentinel_mask=False),            # transformers 5.23, fp32/fp16
    MoeForm("aten._grouped_mm", sentinel_mask=False),  # transformers 5.23, bf16
    MoeForm(FALLBACK, sentinel_mask=True),             # transformers 5.17, fp32/fp16
    MoeForm("aten._grouped_mm", sentinel_mask=True),   # transformers 5.17, bf16 (CUDA)
)


def _last(d, rank) -> bool:
    if isinstance(d, (list, tuple)):
        d = d[0] if len(d) == 1 else None
    return isinstance(d, int) and d in (-1, rank - 1)


def moe_pattern(form: MoeForm) -> Pattern:
    grouped_mm = form.grouped_mm
    p = PatternBuilder(form.name,
                       "router softmax/top-k/renormalize + grouped_mm experts -> kiln.fused_moe")
    x, logits, wgu, wd, arange = p.inputs("x", "router_logits", "w_gate_up", "w_down", "arange")
    k, k2, sd, td, E, emax, split = p.const("top_k", "k2", "sd", "td", "E", "emax", "split")
    sm = p.op("aten._softmax", p.cast(logits), dim=sd, half_to_float=False, name="probs")
    topv, topi = p.op("aten.topk", sm, results=["topv", "topi"], k=k, dim=p.default(td, -1))
    wsum = p.op("aten.sum", topv, dim=[-1], keepdim=True, name="wsum")
    renorm = p.op("aten.div", topv, wsum, optional=True, name="renorm")
    weights = p.cast(renorm, name="weights")
    flat_ids = p.op("aten.reshape", topi, shape=[-1], name="flat_ids")
    sorted_ids, perm = p.op("aten.sort", flat_ids, results=["sorted_ids", "perm"])
    tokens = p.op("aten.div", perm, k2, rounding_mode="floor", name="tokens")
    xs = p.op("aten.index", x, [tokens], name="xs")
    wflat = p.op("aten.reshape", weights, shape=[-1], name="wflat")
    ws = p.op("aten.index", wflat, [perm], name="ws")
    hist = p.op("aten.histc", p.cast(sorted_ids), bins=E, max=emax, name="hist")
    offs = p.op("aten.cumsum", hist, dim=0, dtype=torch.int32, name="offs")
    if form.sentinel_mask:
        oob = p.op("aten.ge", sorted_ids, E, name="oob")
        mask = p.op("aten.unsqueeze", oob, dim=-1, name="mask")
        # masked_fill's 0.0: CSE shares one scalar_tensor between the layers
        zero = p.op("aten.scalar_tensor", Const("fill"), any_attrs=True, shared=True, name="zero")

        def masked(v, name):
            return p.op("aten.where", mask, zero, v, name=name)
    else:
        def masked(v, name):
            return v
    wgu_t = p.op("aten.permute", wgu, dims=[0, 2, 1], name="wgu_t")
    h = masked(p.op(grouped_mm, p.cast(masked(xs, "xs_m")), wgu_t, offs, name="h"), "h_m")
    gate, up = p.op("aten.split_with_sizes", h, results=["gate", "up"], split_sizes=split, dim=-1)
    act = p.op("kiln.silu_mul", gate, up, name="act")
    wd_t = p.op("aten.permute", wd, dims=[0, 2, 1], name="wd_t")
    y = masked(p.op(grouped_mm, p.cast(act), wd_t, offs, name="y"), "y_m")
    wcol = p.op("aten.unsqueeze", ws, dim=-1, name="wcol")
    yw = p.op("aten.mul", y, wcol, name="yw")
    # torch.empty_like(perm): a kiln op once the registry knows it (pure, so CSE may share
    # it between layers: then it is `shared` and DCE removes it), opaque otherwise.
    known = "aten.empty_permuted" in REGISTRY
    empty = p.op("aten.empty_permuted" if known else "torch.aten.empty_permuted.default",
                 any_attrs=True, shared=known, name="empty")
    inv = p.op("aten.index_put", empty, [perm], arange, name="inv")
    yo = p.op("aten.index", p.cast(yw), [inv], name="yo")
    y3 = p.op("aten.reshape", yo, shape=Const("_"), name="y3")
    out = p.op("aten.sum", y3, dim=[1], name="out")
    final = p.cast(out, name="final")

    def shapes(m: Match) -> bool:
        X, L, Wgu, Wd = (m[n].type for n in ("x", "router_logits", "w_gate_up", "w_down"))
        if not all(isinstance(t, TensorType) for t in (X, L, Wgu, Wd)):
            return False
        if X.rank != 2 or L.rank != 2 or Wgu.rank != 3 or Wd.rank != 3:
            return False
        T, H = X.shape
        n_exp, two_i, h_in = Wgu.shape
        inter = Wd.shape[2]
        return (dims_equal(L.shape[0], T) and dims_equal(L.shape[1], n_exp)
                and m["E"] == n_exp and m["emax"] == n_exp - 1
                and dims_equal(Wd.shape[0], n_exp) and dims_equal(Wd.shape[1], H)
                and dims_equal(h_in, H) and dims_equal(two_i, 2 * inter)
                and list(m["split"]) == [inter, inter]
                and m["k2"] == m["top_k"] and _last(m["sd"], 2) and _last(m["td"], 2)
                and dims_equal(list(m["y3"].type.shape), [T, m["top_k"], H]))

    def inverse_permutation(m: Match) -> bool:
        a: Value = m["arange"]
        n = a.producer
        if n is None or n.op != "aten.arange" or not isinstance(a.type, TensorType):
            return False
        start_ok = len(n.args) == 1 or (len(n.args) == 2 and n.args[0] == 0)
        step_ok = n.attrs.get("step", 1) == 1
        return start_ok and step_ok and dims_equal(a.type.shape, m["perm"].type.shape)

    def out_type(m: Match) -> bool:
        return m["final"].type == m["x"].type

    p.where(shapes, "shapes: x [T, H], logits [T, E], w_gate_up [E, 2I, H], w_down [E, H, I]")
    if form.sentinel_mask:
        p.where(lambda m: m["fill"] == 0, "masked rows are filled with 0")
    p.where(inverse_permutation, "the inverse permutation scatters arange(T * top_k)")
    p.where(out_type, "the block returns x's type")
    p.replace(lambda m, b: b.op("kiln.fused_moe", m["x"], m["router_logits"], m["w_gate_up"],
                                m["w_down"], top_k=m["top_k"], renormalize=m.present("renorm")))
    return p.build(final)


_PATTERNS: dict[MoeForm, Pattern] = {}


def moe_patterns(g: Graph) -> list[Pattern]:
    """The MoE patterns for the grouped-mm ops this graph actually contains (the
    transformers custom op is only known once transformers registered it)."""
    present = {n.op for n in g.nodes}
    out = []
    for form in FORMS:
        if form.grouped_mm in present:
            if form not in _PATTERNS:
                _PATTERNS[form] = moe_pattern(form)
            out.append(_PATTERNS[form])
    return out
