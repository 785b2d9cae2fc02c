"""Generated Triton kernels: a pointwise function outlined by `schedule` -> kernel + launcher.

The callee is a graph of elementwise ops whose outputs share one shape S (every operand
broadcasts to S). It becomes one `@triton.jit` kernel over the flat index of S, one
program per BLOCK elements, and a Python launcher that allocates the outputs and passes
each input's strides against S (0 along broadcast dimensions). The source is text in the
wrapper module, so `KILN_DUMP_DIR` and `kiln dump` show exactly what runs.

Numerics follow torch.compile's, not eager's op-by-op rounding: floating values are
computed in float32 and rounded once, at the store, to the output dtype; an explicit cast
in the graph (`_to_copy`, `convert_element_type`) still rounds where the graph says so.

Lowering rules are data: `POINTWISE` maps an op to a function from operand expressions
(and the node's literals) to a Triton expression, or None where this use of the op is not
supported (the op then stays a torch call). `can_generate` is what `schedule` asks.
"""
from __future__ import annotations

import math

import torch

from kiln.ir import Graph, TensorType, Value

TL_DTYPES = {torch.float32: "tl.float32", torch.float16: "tl.float16",
             torch.bfloat16: "tl.bfloat16", torch.int64: "tl.int64", torch.int32: "tl.int32",
             torch.int16: "tl.int16", torch.int8: "tl.int8", torch.uint8: "tl.uint8",
             torch.bool: "tl.int1"}
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024
NUM_WARPS = 4


class Operand:
    """A kernel-side operand: an expression and the torch dtype it stands for (None for a
    Python literal)."""

    def __init__(self, expr: str, dtype: torch.dtype | None, literal=None):
        self.expr, self.dtype, self.literal = expr, dtype, literal

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOATS if self.dtype is not None else isinstance(self.literal, float)

    def f32(self) -> str:
        if self.dtype is None:
            return _float_literal(float(self.literal))
        # fp16/bf16 loads too: Triton's math (exp, sigmoid, libdevice) takes fp32 only, and
        # numerics are float32 until the store. A cast of a float32 value is free.
        return self.expr if self.dtype == torch.float32 else f"{self.expr}.to(tl.float32)"

    def pred(self) -> str:
        """As a boolean (non-zero is true)."""
        return self.expr if self.dtype == torch.bool else f"({self.expr} != 0)"


def _float_literal(x: float) -> str:
    if math.isnan(x):
        return 'float("nan")'
    if math.isinf(x):
        return 'float("inf")' if x > 0 else 'float("-inf")'
    return repr(x)


def _literal(x) -> str:
    if isinstance(x, bool):
        return "True" if x else "False"
    if isinstance(x, float):
        return _float_literal(x)
    return repr(x)


def _arith(fn):
    """Binary/unary arithmetic: float operands (or a float result) compute in float32."""
    def lower(ops, attrs, out):
        if out in FLOATS:
            return fn(*[o.f32() for o in ops], attrs=attrs)
        if any(o.dtype is not None and o.dtype in FLOATS for o in ops):
            return None
        return fn(*[o.expr for o in ops], attrs=attrs)
    return lower


def _float_only(fn):
    def lower(ops, attrs, out):
        return fn(*[o.f32() for o in ops], attrs=attrs) if out in FLOATS else None
    return lower


def _compare(sym):
    def lower(ops, attrs, out):
        a, b = ops
        if a.is_float or b.is_float:
            return f"({a.f32()} {sym} {b.f32()})"
        return f"({a.expr} {sym} {b.expr})"
    return lower


def _add(a, b, attrs, sign="+"):
    alpha = attrs.get("alpha", 1)
    return f"({a} {sign} {b})" if alpha == 1 else f"({a} {sign} {_literal(alpha)} * {b})"


def _div(ops, attrs, out):
    if attrs.get("rounding_mode") is not None or out not in FLOATS:
        return None
    a, b = ops
    return f"({a.f32()} / {b.f32()})"


def _pow(ops, attrs, out):
    a, b = ops
    if b.dtype is not None or out not in FLOATS:
        return None   # a tensor exponent: torch.pow's integer/negative-base rules, not here
    x = a.f32()
    table = {2: f"({x} * {x})", 3: f"({x} * {x} * {x})", 1: x, 0.5: f"tl.sqrt({x})",
             -0.5: f"tl.rsqrt({x})", -1: f"(1.0 / {x})", -2: f"(1.0 / ({x} * {x}))"}
    return table.get(b.literal)


def _gelu(a, attrs):
    if attrs.get("approximate", "none") == "tanh":   # 0.5 (1 + tanh z) == sigmoid(2 z)
        return f"({a} * tl.sigmoid(1.5957691216057308 * ({a} + 0.044715 * {a} * {a} * {a})))"
    return f"(0.5 * {a} * (1.0 + tl.erf({a} * 0.7071067811865476)))"


def _clamp(ops, attrs, out):
    x = ops[0]
    lo = ops[1] if len(ops) > 1 else attrs.get("min")
    hi = ops[2] if len(ops) > 2 else attrs.get("max")
    if isinstance(lo, Operand):
        lo = lo.literal if lo.dtype is None else None
    if isinstance(hi, Operand):
        hi = hi.literal if hi.dtype is None else None
    e = x.f32() if out in FLOATS else x.expr
    if lo is not None:
        e = f"tl.maximum({e}, {_literal(float(lo) if out in FLOATS else lo)})"
    if hi is not None:
        e = f"tl.minimum({e}, {_literal(float(hi) if out in FLOATS else hi)})"
    return e


def _where(ops, attrs, out):
    c, a, b = ops
    if out in FLOATS:
        return f"tl.where({c.pred()}, {a.f32()}, {b.f32()})"
    return f"tl.where({c.pred()}, {a.expr}, {b.expr})"


def _masked_fill(ops, attrs, out):
    x, m, v = ops
    if out in FLOATS:
        return f"tl.where({m.pred()}, {v.f32()}, {x.f32()})"
    return f"tl.where({m.pred()}, {v.expr}, {x.expr})"


def _cast(ops, attrs, out):
    x = ops[0]
    if attrs.get("device") is not None and not isinstance(attrs.get("device"), torch.device):
        return None
    if out == torch.bool:
        return x.pred()
    if out in FLOATS:
        v = x.f32()
        return v if out == torch.float32 else f"{v}.to({TL_DTYPES[out]}).to(tl.float32)"
    return f"{x.expr}.to({TL_DTYPES[out]})"


def _logical(sym):
    def lower(ops, attrs, out):
        return f"({ops[0].pred()} {sym} {ops[1].pred()})"
    return lower


def _bitwise(sym):
    def lower(ops, attrs, out):
        if any(o.is_float for o in ops):
            return None
        return f"({ops[0].expr} {sym} {ops[1].expr})"
    return lower


# op -> lower(operands, attrs, result dtype) -> Triton expression | None
POINTWISE = {
    "aten.add": _arith(lambda a, b, attrs: _add(a, b, attrs)),
    "aten.sub": _arith(lambda a, b, attrs: _add(a, b, attrs, "-")),
    "aten.mul": _arith(lambda a, b, attrs: f"({a} * {b})"),
    "aten.div": _div,
    "aten.neg": _arith(lambda a, attrs: f"(-{a})"),
    "aten.pow": _pow,
    "aten.maximum": _arith(lambda a, b, attrs: f"tl.maximum({a}, {b})"),
    "aten.minimum": _arith(lambda a, b, attrs: f"tl.minimum({a}, {b})"),
    "aten.relu": _arith(lambda a, attrs: f"tl.maximum({a}, 0)"),
    "aten.abs": _arith(lambda a, attrs: f"tl.abs({a})"),
    "aten.exp": _float_only(lambda a, attrs: f"tl.exp({a})"),
    "aten.log": _float_only(lambda a, attrs: f"tl.log({a})"),
    "aten.sqrt": _float_only(lambda a, attrs: f"tl.sqrt({a})"),
    "aten.rsqrt": _float_only(lambda a, attrs: f"tl.rsqrt({a})"),
    "aten.reciprocal": _float_only(lambda a, attrs: f"(1.0 / {a})"),
    "aten.sigmoid": _float_only(lambda a, attrs: f"tl.sigmoid({a})"),
    "aten.tanh": _float_only(lambda a, attrs: f"(2.0 * tl.sigmoid(2.0 * {a}) - 1.0)"),
    "aten.silu": _float_only(lambda a, attrs: f"({a} * tl.sigmoid({a}))"),
    "aten.gelu": _float_only(_gelu),
    "aten.cos": _float_only(lambda a, attrs: f"tl.cos({a})"),
    "aten.sin": _float_only(lambda a, attrs: f"tl.sin({a})"),
    "aten.erf": _float_only(lambda a, attrs: f"tl.erf({a})"),
    "aten.floor": _float_only(lambda a, attrs: f"tl.floor({a})"),
    "aten.ceil": _float_only(lambda a, attrs: f"tl.ceil({a})"),
    "aten.clamp": _clamp,
    "aten.clamp_min": lambda ops, attrs, out: _clamp([ops[0]], {"min": ops[1].literal}, out)
    if ops[1].dtype is None else None,
    "aten.clamp_max": lambda ops, attrs, out: _clamp([ops[0]], {"max": ops[1].literal}, out)
    if ops[1].dtype is None else None,
    "aten.where": _where,
    "aten.masked_fill": _masked_fill,
    "aten.eq": _compare("=="), "aten.ne": _compare("!="), "aten.lt": _compare("<"),
    "aten.le": _compare("<="), "aten.gt": _compare(">"), "aten.ge": _compare(">="),
    "aten.logical_and": _logical("&"), "aten.logical_or": _logical("|"),
    "aten.logical_not": lambda ops, attrs, out: f"({ops[0].expr} == 0)",
    "aten.bitwise_and": _bitwise("&"), "aten.bitwise_or": _bitwise("|"),
    "aten.isnan": lambda ops, attrs, out: f"({ops[0].f32()} != {ops[0].f32()})"
    if ops[0].is_float else None,
    "aten._to_copy": _cast,
    "prims.convert_element_type": _cast,
    "aten.clone": lambda ops, attrs, out: ops[0].expr if ops[0].dtype == out else None,
}
# Constants folded into the kernel as literals: `aten.scalar_tensor(value, dtype=...)`.
CONSTANTS = {"aten.scalar_tensor"}
_OPERAND_ATTRS = {"other", "mask", "value", "self", "input", "exponent", "condition"}


def _operands(node) -> list:
    """The node's operands in schema order: positional args, then tensor-valued attrs."""
    out = list(node.args)
    for k, a in node.attrs.items():
        if k in _OPERAND_ATTRS:
            out.append(a)
    return out


def _scalar_attrs(node) -> dict:
    return {k: a for k, a in node.attrs.items() if k not in _OPERAND_ATTRS}


def _is_supported_tensor(t) -> bool:
    return isinstance(t, TensorType) and t.dtype in TL_DTYPES


# Row reductions over the last dim with keepdim (what norms and softmaxes are made of):
# op -> (Triton reduction, identity for masked lanes, divide by the row length).
REDUCTIONS = {"aten.sum": ("tl.sum", "0.0", False), "aten.mean": ("tl.sum", "0.0", True),
              "aten.amax": ("tl.max", 'float("-inf")', False),
              "aten.amin": ("tl.min", 'float("inf")', False)}
MAX_ROW = 16384   # one program holds a whole row in registers


def _row_reduction(node) -> bool:
    """A keepdim reduction of a float tensor over its last dim, of a static length."""
    if node.op not in REDUCTIONS or len(node.args) != 1 or set(node.attrs) - {"dim", "keepdim"}:
        return False
    x = node.args[0]
    if not isinstance(x, Value) or not _is_supported_tensor(x.type) or x.type.dtype not in FLOATS:
        return False
    rank = x.type.rank
    last = x.type.shape[-1] if rank else None
    return (node.attrs.get("keepdim") is True and node.attrs.get("dim") in ([-1], [rank - 1])
            and isinstance(last, int) and 1 <= last <= MAX_ROW
            and node.results[0].type.dtype in FLOATS)


def _arange_bounds(node):
    """(start, step) of `aten.arange` with int literals, else None."""
    args = list(node.args)
    if len(args) not in (1, 2, 3) or not all(type(a) is int for a in args):
        return None
    step = args[2] if len(args) == 3 else node.attrs.get("step", 1)
    start = args[0] if len(args) >= 2 else 0
    return (start, step) if type(step) is int else None


def _index_source(v) -> bool:
    """`v` is an index tensor a kernel computes from its own coordinates instead of loading:
    an `aten.arange`, seen through unsqueezes that keep it aligned with the right end of
    the shape (what a cache position or a mask's key positions are made of). Each costs a
    launch of its own otherwise, for a few elements."""
    n = v.producer if isinstance(v, Value) else None
    if n is None:
        return False
    if n.op == "aten.arange":
        return _arange_bounds(n) is not None and n.results[0].type.rank == 1
    if n.op == "aten.unsqueeze":
        x = n.args[0]
        d = n.attrs.get("dim", 0)
        d = d + x.type.rank + 1 if d < 0 else d
        # Broadcasting aligns shapes at the right: inserting a 1 left of every non-1 dim of x
        # leaves each element where it was.
        return all(size == 1 for size in x.type.shape[:d]) and _index_source(x)
    return False


INDEX_SOURCES = {"aten.arange", "aten.unsqueeze"}


def _source_device(fn: Graph) -> str:
    """Where a kernel that reads no tensor (it computes index sources only) puts its
    outputs: the device its aranges name (the compiler points them at the target's), else
    torch's default device."""
    for n in fn.nodes:
        dev = n.attrs.get("device") if n.op == "aten.arange" else None
        if isinstance(dev, torch.device):
            return f"torch.device({str(dev)!r})"
    return "torch.get_default_device()"


def can_generate(node) -> bool:
    """Whether the pointwise codegen lowers this node (asked by the schedule pass)."""
    if len(node.results) != 1 or not _is_supported_tensor(node.results[0].type):
        return False
    if node.op in INDEX_SOURCES:
        return _index_source(node.results[0])
    if node.op in CONSTANTS:
        value = node.args[0] if node.args else None
        return isinstance(value, (int, float, bool)) and node.results[0].type.rank == 0
    if node.op in REDUCTIONS:
        return _row_reduction(node)
    lower = POINTWISE.get(node.op)
    if lower is None:
        return False
    ops = []
    for a in _operands(node):
        if isinstance(a, Value):
            if not _is_supported_tensor(a.type):
                return False
            ops.append(Operand("x", a.type.dtype))
        elif isinstance(a, (bool, int, float)) or a is None:
            ops.append(Operand(_literal(a), None, a))
        else:
            return False
    try:
        return lower(ops, _scalar_attrs(node), node.results[0].type.dtype) is not None
    except (KeyError, TypeError, ValueError, IndexError):
        return False


def _domain(fn: Graph):
    """(shape every value broadcasts to, whether the kernel works row by row)."""
    rows = [n for n in fn.nodes if n.op in REDUCTIONS]
    if rows:
        return rows[0].args[0].type.shape, True
    return fn.outputs[0].type.shape, False


def generate(fn: Graph, name: str, host_fallback: str | None = None) -> str:
    """Python source defining `<name>_kernel` (@triton.jit) and its launcher `<name>`. With
    `host_fallback`, the launcher calls that function instead when an input is on the CPU
    (unless the module's ON_HOST_OK says Triton's interpreter runs host tensors).

    Flat kernels (elementwise only): one program per BLOCK elements of the output shape.
    Row kernels (with last-dim reductions): one program per row of the reduced tensor's
    shape S = [..., C], the whole row in BLOCK_C >= C lanes; reductions mask the lanes past
    C with their identity; outputs are either S-shaped or one value per row ([..., 1])."""
    shape, by_row = _domain(fn)
    rank = len(shape)
    inputs = fn.inputs
    env: dict[Value, Operand] = {}
    body: list[str] = []
    loads = []
    lead = rank - 1 if by_row else rank        # dims unravelled from the program's index
    for i, v in enumerate(inputs):
        t = v.type
        ptr = f"in{i}"
        if t.rank == 0:
            load = f"tl.load({ptr})"
        elif by_row:
            off = " + ".join([f"c{k} * {ptr}_s{k}" for k in range(lead)] + [f"cols * {ptr}_s{lead}"])
            load = (f"tl.load({ptr} + (row * C + cols if {ptr.upper()}_CONTIG else {off}), "
                    f"mask=cmask, other=0)")
        else:
            off = " + ".join(f"c{k} * {ptr}_s{k}" for k in range(rank)) or "0"
            load = f"tl.load({ptr} + (idx if {ptr.upper()}_CONTIG else {off}), mask=mask, other=0)"
        loads.append(f"    a{i} = {load}")
        env[v] = Operand(f"a{i}", t.dtype)
    k = 0
    for n in fn.nodes:
        r = n.results[0]
        dtype = r.type.dtype
        if n.op in CONSTANTS:
            value = n.args[0]
            value = float(value) if dtype in FLOATS else (bool(value) if dtype == torch.bool
                                                          else int(value))
            env[r] = Operand(_literal(value), None, value)
            continue
        if n.op == "aten.arange":
            start, step = _arange_bounds(n)
            last = "cols" if by_row else f"c{rank - 1}"
            # One element broadcasts along the domain's last dim: it is `start` everywhere.
            expr = f"({start} + {0 if r.type.shape[-1] == 1 else step} * {last})"
            if dtype in FLOATS:
                expr = f"({expr}).to(tl.float32)"
        elif n.op == "aten.unsqueeze":
            expr = env[n.args[0]].expr
        elif n.op in REDUCTIONS:
            fn_name, identity, mean = REDUCTIONS[n.op]
            x = env[n.args[0]].f32()
            expr = f"{fn_name}(tl.where(cmask, {x}, {identity}), axis=0)"
            if mean:
                expr = f"({expr} / C)"
        else:
            ops = [env[a] if isinstance(a, Value) else Operand(_literal(a), None, a)
                   for a in _operands(n)]
            expr = POINTWISE[n.op](ops, _scalar_attrs(n), dtype)
            if expr is None:
                raise ValueError(f"codegen: {n.op} is not lowerable here (schedule asked can_generate)")
        if dtype not in FLOATS and dtype != torch.bool:
            expr = f"({expr}).to({TL_DTYPES[dtype]})"
        body.append(f"    v{k} = {expr}   # {n.op}")
        env[r] = Operand(f"v{k}", dtype)
        k += 1
    stores = []
    reduced_out = []
    for j, v in enumerate(fn.outputs):
        o = env[v]
        tl_dtype = TL_DTYPES[v.type.dtype]
        width = "[BLOCK_C]" if by_row else "[BLOCK]"
        val = o.expr if o.dtype is not None else f"tl.full({width}, {o.expr}, tl.float32)"
        if by_row and tuple(v.type.shape) != tuple(shape):   # one value per row
            reduced_out.append(j)
            stores.append(f"    tl.store(out{j} + row + cols * 0, tl.broadcast_to({val}, [BLOCK_C])"
                          f".to({tl_dtype}), mask=cols == 0)")
        elif by_row:
            stores.append(f"    tl.store(out{j} + row * C + cols, ({val}).to({tl_dtype}), mask=cmask)")
        else:
            stores.append(f"    tl.store(out{j} + idx, ({val}).to({tl_dtype}), mask=mask)")

    strided = [i for i, v in enumerate(inputs) if v.type.rank]
    unravel = []
    if by_row:
        prologue = ["    row = tl.program_id(0).to(tl.int64)", "    cols = tl.arange(0, BLOCK_C)",
                    "    cmask = cols < C"]
        if lead:
            unravel.append("    rem = row")
        sizes = ["C"] + [f"d{k}" for k in range(lead)]
        consts = ["BLOCK_C: tl.constexpr"]
    else:
        prologue = ["    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)",
                    "    mask = idx < numel"]
        if rank:
            unravel.append("    rem = idx")
        sizes = ["numel"] + [f"d{k}" for k in range(rank)]
        consts = ["BLOCK: tl.constexpr"]
    if unravel:
        for d in reversed(range(1, lead)):
            unravel.append(f"    c{d} = rem % d{d}")
            unravel.append(f"    rem = rem // d{d}")
        unravel.append("    c0 = rem")
    params = ([f"in{i}" for i in range(len(inputs))] + [f"out{j}" for j in range(len(fn.outputs))]
              + sizes + [f"in{i}_s{k}" for i in strided for k in range(rank)]
              + consts + [f"IN{i}_CONTIG: tl.constexpr" for i in strided])
    ops_doc = ", ".join(n.op.split(".")[-1] for n in fn.nodes)
    kernel = ["@triton.jit", f"def {name}_kernel({', '.join(params)}):", f'    """{ops_doc}"""',
              *prologue, *unravel, *loads, *body, *stores]

    args = [f"a{i}" for i in range(len(inputs))]
    launcher = [f"def {name}({', '.join(args)}):"]
    if host_fallback:
        on_host = " or ".join(f"{a}.device.type == 'cpu'" for a in args)
        launcher.append(f"    if not ON_HOST_OK and ({on_host}):")
        launcher.append(f"        return {host_fallback}({', '.join(args)})")
    # Index sources have static shapes that the inputs' shapes may not cover.
    static = [tuple(n.results[0].type.shape) for n in fn.nodes if n.op in INDEX_SOURCES]
    launcher.append(f"    shape = torch.broadcast_shapes({''.join(a + '.shape, ' for a in args)}"
                    f"{''.join(repr(t) + ', ' for t in dict.fromkeys(static))})")
    device = "a0.device" if args else _source_device(fn)
    outs = []
    for j, v in enumerate(fn.outputs):
        dims = "shape[:-1] + (1,)" if j in reduced_out else "shape"
        launcher.append(f"    out{j} = torch.empty({dims}, dtype=torch.{str(v.type.dtype).split('.')[-1]}, "
                        f"device={device})")
        outs.append(f"out{j}")
    ret = ", ".join(outs) + ("," if len(outs) == 1 else "")
    launcher.append("    numel = shape.numel()")
    launcher.append("    if numel == 0:")
    launcher.append(f"        return ({ret})")
    strides = [f"*a{i}.expand(shape).stride()" for i in strided]
    contig = [f"IN{i}_CONTIG=a{i}.shape == shape and a{i}.is_contiguous()" for i in strided]
    if by_row:
        launcher.append("    C = shape[-1]")
        launcher.append("    block_c = triton.next_power_of_2(C)")
        call = ", ".join(args + outs + ["C", "*shape[:-1]"] + strides
                         + ["BLOCK_C=block_c"] + contig
                         + ["num_warps=4 if block_c <= 2048 else (8 if block_c <= 8192 else 16)"])
        launcher.append(f"    {name}_kernel[(numel // C,)]({call})")
    else:
        call = ", ".join(args + outs + ["numel", "*shape"] + strides
                         + [f"BLOCK={BLOCK}"] + contig + [f"num_warps={NUM_WARPS}"])
        launcher.append(f"    {name}_kernel[(triton.cdiv(numel, {BLOCK}),)]({call})")
    launcher.append(f"    return ({ret})")
    return "\n".join(kernel) + "\n\n\n" + "\n".join(launcher) + "\n"


_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
                  torch.int64: "*i64", torch.int32: "*i32", torch.int16: "*i16",
                  torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1"}


def aot_spec(fn: Graph, name: str, kernel):
    """The KernelSpec (backends/triton/aot.py) of a generated kernel for contiguous
    inputs: what CI compiles for cuda and hip."""
    from .aot import make_spec
    shape, by_row = _domain(fn)
    types, constants = {}, {}
    for p in kernel.arg_names:
        if p.startswith("in") and p[2:].isdigit():
            types[p] = _POINTER_TYPES[fn.inputs[int(p[2:])].type.dtype]
        elif p.startswith("out"):
            types[p] = _POINTER_TYPES[fn.outputs[int(p[3:])].type.dtype]
        elif p.endswith("_CONTIG"):
            constants[p] = True
        elif p == "BLOCK":
            constants[p] = BLOCK
        elif p == "BLOCK_C":
            constants[p] = 1 << (int(shape[-1]) - 1).bit_length()
        else:
            types[p] = "i64" if p == "numel" else "i32"
    pointers = tuple(p for p, t in types.items() if t.startswith("*"))
    return make_spec(name, kernel, types, constants, num_warps=NUM_WARPS, divisible_by_16=pointers)
