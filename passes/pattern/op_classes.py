"""Classes of graph nodes that the matcher and passes recognize: dtype casts (`is_cast`,
the op registry's cast trait; `CAST_OPS`, the ops a `cast(%x)` statement can be), linear
layers as captured (`match_linear`), MoE routers (`feeds_router`) and the LM head
(`is_lm_head`), the last two through the view and cast traits. The matcher uses the casts;
rules call the router and LM-head tests (`feeds_router(%y)`, `is_lm_head(%y)`);
fuse.parallel_linear uses `match_linear` and `feeds_router`."""
from __future__ import annotations

from kiln.ir import Node, TensorType, Value
from kiln.ir.ops import cast_ops, get_op, is_dtype_cast

CAST_OPS = cast_ops()


def match_linear(n: Node) -> tuple[Value, Value, object] | None:
    """(x, W, bias) of a linear layer as captured: `mm(x, permute(W, [1, 0]))` or
    `addmm(bias, x, permute(W, [1, 0]))` with W a rank-2 [N, K] tensor; else None."""
    if n.op == "aten.mm" and len(n.args) == 2:
        bias, (x, wt) = None, n.args
    elif n.op == "aten.addmm" and len(n.args) == 3:
        bias, x, wt = n.args
    else:
        return None
    if set(n.attrs) - {"beta", "alpha"} or any(a != 1 for a in n.attrs.values()):
        return None
    if not isinstance(x, Value) or not isinstance(wt, Value) or wt.producer is None:
        return None
    p = wt.producer
    if p.op != "aten.permute" or list(p.attrs.get("dims", [])) != [1, 0]:
        return None
    w = p.args[0]
    if not isinstance(w, Value) or not isinstance(w.type, TensorType) or w.type.rank != 2:
        return None
    return x, w, bias


ROUTER_USERS = {"aten._softmax", "aten.topk", "aten._log_softmax"}


def feeds_router(v: Value, users: dict) -> bool:
    """True when `v` (a linear's output) reaches softmax / top-k within a few views or
    casts: an MoE router, whose pattern fuse.moe matches and which stays full precision."""
    todo = [v]
    for _ in range(4):
        nxt = []
        for x in todo:
            for u in users.get(x, []):
                if u.op in ROUTER_USERS:
                    return True
                if is_cast(u) or get_op(u.op).has("view"):
                    nxt.extend(u.results)
        todo = nxt
    return False


def is_lm_head(v: Value, users: dict, outputs: set) -> bool:
    """True when `v` only reaches graph outputs, through single-use views and casts: the
    LM head's logits."""
    for _ in range(16):
        us = users.get(v, [])
        if not us:
            return v in outputs
        if len(us) > 1 or not (get_op(us[0].op).has("view") or is_cast(us[0])) or len(us[0].results) != 1:
            return False
        v = us[0].results[0]
    return False


def is_cast(n: Node) -> bool:
    """A dtype cast, as `cast(%x)` in a rule matches it (kiln.ir.ops.is_dtype_cast)."""
    return is_dtype_cast(n)
