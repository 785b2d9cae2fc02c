"""quantize: opt-in weight + activation quantisation of linear layers (`quant="fp8"` or
`"int8"` in the compile options; off by default), or of the weights alone, every linear
including the LM head, no layer kept: `quant="int8_weight_only"` (per output channel,
`kiln.weight_int8_mm`) or `"int4_weight_only"` (asymmetric, groups of 32 along K;
`_g64` / `_g128` for larger groups; `kiln.quant_int4` + `kiln.weight_int4_mm`) or
`"int8_weight_only_g32"` (asymmetric int8 in groups of 32 along K, `_g64` / `_g128`;
`kiln.quant_int8_grouped` + `kiln.weight_int8_grouped_mm`); a weight whose shape a grouped
layout does not take (kiln_ref.int4_fits, int8_grouped_fits) gets per-channel int8. A
weight-only LM head is followed by `kiln.refine_top_logits`, which recomputes each row's
16 best logits from the unquantised weight: the greedy token is the unquantised head's.

Each linear layer, `aten.mm(a, permute(W, [1, 0]))` or `aten.addmm(bias, a, permute(W,
[1, 0]))` with W an [N, K] weight (a graph input, or a `cat` of graph inputs as
fuse.parallel_linear writes them), becomes

    %wq, %ws = kiln.quant_fp8(%W, none, fp8_dtype=...)   // per output channel: one scale
    %aq, %as = kiln.quant_fp8(%x, none, fp8_dtype=...)   //   per row of W, per token of x
    %y = kiln.scaled_mm(%aq, %as, %wq, %ws, %bias, out_dtype=<a's dtype>)

(`kiln.quant_int8` for int8). The weight quantisation is `kiln_ref.quantize_weight`:
the same per-row dynamic quantisation applied to W. Each weight and each activation is
quantised once however many linears read it (q/k/v share their input). When the linear
reads `reshape(x)` that only merges leading dims, the activation is quantised before the
reshape (per-token scales do not change) and `q` and `scale` are reshaped instead, so the
quantisation sits right after the op that produced x, where fuse.quant can fold it into
rms_norm / silu_mul.

Stay in full precision: the LM head (a linear whose result only reaches a graph output
through views and casts) and MoE routers (a linear feeding softmax / top-k), as in vLLM
and most quantised checkpoints; and, in models of 8 or more layers, the linears of the
first and the last decoder layer (found by weight name, `...layers.N...`), the layers
most sensitive to quantisation noise. `options["quant_keep"]` (regexes on weight names)
replaces that last choice. The weight quantisation reads only weights, so weight
preparation (passes/weight_prep.py) moves it out of the per-call graph: it runs once per
set of weight tensors.

The rules are `rules/quantize.kiln`. What they cannot say is registered from here as
rule functions: `quant_dtype()` (the option and the target's fp8 flavour),
`quant_weight(%w)` and `quant_keeps(%w)` (the keep policy, which needs every weight
name in the graph). The pass applies the rules, then CSE shares the quantisations.
"""
from __future__ import annotations

import re

import torch

from kiln.ir import Graph, Value, kiln_ref

from .canonicalize import canonicalize
from .manager import PassContext, register_pass
from .pattern import RuleContext
from .rule_pass import run_rules
from .rules import load_rules, register_function

MIN_LAYERS_TO_KEEP_ENDS = 8
# The `quant` compile option's values: weights and activations (per-token, dynamic) in fp8
# or int8, or the weights alone in int8 or int4 (activations stay in their dtype). Each
# int4 mode's group size (weights per (scale, zero) along K).
INT4_GROUPS = {"int4_weight_only": 32, "int4_weight_only_g64": 64, "int4_weight_only_g128": 128}
# Grouped int8 modes: each one's group size (asymmetric int8, kiln.quant_int8_grouped).
INT8_GROUPS = {"int8_weight_only_g32": 32, "int8_weight_only_g64": 64,
               "int8_weight_only_g128": 128}
QUANT_MODES = ("fp8", "int8", "int8_weight_only", *INT8_GROUPS, *INT4_GROUPS)
WEIGHT_ONLY = ("int8_weight_only", *INT8_GROUPS, *INT4_GROUPS)


def check_quant(mode) -> None:
    if mode is not None and mode not in QUANT_MODES:
        raise ValueError(f"quant must be None or one of {', '.join(QUANT_MODES)}; got {mode!r}")


def _fits(layout_fits):
    """A rule function: whether weight %w has the grouped layout `layout_fits` checks."""
    def fits(w, group_size) -> bool:
        t = w.type if isinstance(w, Value) else None
        return (t is not None and t.rank == 2 and group_size is not None
                and layout_fits(t.shape[0], t.shape[1], group_size) is None)
    return fits


def _qdtype(options: dict) -> torch.dtype | None:
    mode = options.get("quant")
    check_quant(mode or None)
    if not mode:
        return None
    if mode == "fp8":
        target = options.get("target")
        return getattr(target, "fp8_dtype", None) or torch.float8_e4m3fn
    return torch.int8


def _quant_weight(w: Value) -> bool:
    """W is a weight: a graph input, or a `cat` of graph inputs (fuse.parallel_linear's)."""
    if w.producer is None:
        return True
    p = w.producer
    return p.op == "aten.cat" and p.attrs.get("dim", 0) in (0, -2) and all(
        isinstance(x, Value) and x.producer is None for x in p.args[0])


def _weight_names(w: Value) -> list[str]:
    if w.producer is None:
        return [w.name or ""]
    return [x.name or "" for x in w.producer.args[0]]


def _layer(name: str) -> int | None:
    m = re.search(r"(?:^|\.)layers?\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _keep_policy(g: Graph, options: dict):
    """Which weights stay in full precision. `options["quant_keep"]` (regexes on weight
    names) overrides the default: the first and the last decoder layer of models with at
    least MIN_LAYERS_TO_KEEP_ENDS layers (the layers most sensitive to quantisation noise:
    on SmolLM2, teacher-forced top-1 agreement with the unquantised model over 256 tokens
    goes from 91.4% to 93.4% with fp8 and from 89.5% to 91.8% with int8)."""
    patterns = options.get("quant_keep")
    if patterns is not None:
        regs = [re.compile(p) for p in ([patterns] if isinstance(patterns, str) else patterns)]
        return lambda w: any(r.search(n) for r in regs for n in _weight_names(w))
    if options.get("quant") in WEIGHT_ONLY:
        # Weights alone lose less than weights and activations (SmolLM2: 94.5% top-1 with
        # every linear in int8, against 91.8% for int8 W8A8 with the ends kept; BENCHMARKS),
        # and the CPU target it is for reads every layer's bytes each token.
        return lambda w: False
    layers = {_layer(v.name or "") for v in g.inputs} - {None}
    if len(layers) < MIN_LAYERS_TO_KEEP_ENDS:
        return lambda w: False
    ends = {min(layers), max(layers)}
    return lambda w: any(_layer(n) in ends for n in _weight_names(w))


def _quant_keeps(cx: RuleContext, w: Value) -> bool:
    if "quant_keep" not in cx.cache:
        cx.cache["quant_keep"] = _keep_policy(cx.graph, cx.options)
    return cx.cache["quant_keep"](w)


register_function("quant_dtype", lambda cx: _qdtype(cx.options), context=True)
register_function("quant_weight_only", lambda cx: cx.options.get("quant") in WEIGHT_ONLY,
                  context=True)
register_function("quant_int4_group", lambda cx: INT4_GROUPS.get(cx.options.get("quant")),
                  context=True)
register_function("int4_scale_dtype",
                  lambda cx: getattr(cx.options.get("target"), "int4_scale_dtype", torch.float32),
                  context=True)
register_function("quant_int8_group", lambda cx: INT8_GROUPS.get(cx.options.get("quant")),
                  context=True)
register_function("int4_fits", _fits(kiln_ref.int4_fits))
register_function("int8_grouped_fits", _fits(kiln_ref.int8_grouped_fits))
register_function("quant_weight", lambda w: isinstance(w, Value) and _quant_weight(w))
register_function("quant_keeps", _quant_keeps, context=True)


@register_pass("quantize", "opt-in (quant='fp8'|'int8'): linear layers -> per-channel weight "
               "+ per-token activation quantisation and kiln.scaled_mm (LM head and MoE "
               "routers stay full precision); quant='int8_weight_only' / 'int4_weight_only': "
               "int8 / grouped int4 weights, kiln.weight_int8_mm / kiln.weight_int4_mm, the LM "
               "head's top logits refined; 'int8_weight_only_g32' (_g64, _g128): grouped "
               "asymmetric int8, kiln.weight_int8_grouped_mm (rules/quantize.kiln)")
def quantize(g: Graph, ctx: PassContext) -> int:
    if _qdtype(ctx.options) is None:
        return 0
    rules = load_rules("quantize")
    count = run_rules(g, ctx, [p for p in rules if p.name == "quantize_linear"])
    if count:
        run_rules(g, ctx, [p for p in rules if p.name != "quantize_linear"])
        canonicalize(g, ctx)   # one quantisation per weight and per activation
    return count
