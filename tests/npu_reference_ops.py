"""TEST ONLY: CPU reference implementations of the torch_npu operators the npu target calls
(kiln.backends.npu), registered under `torch.ops.npu` with the exact schemas the torch-npu
wheel declares.

`import torch_npu` needs Ascend's CANN, so CI never installs torch-npu; `make setup`
downloads its wheel (version and hash pinned in the Makefile) and keeps the file that
declares its operators, `npu_native_functions_by_codegen.yaml`. `register()` defines each
operator below from its line there, so torch's dispatcher checks every call kiln emits
(argument names, positional vs keyword-only, types, arity) against torch_npu's own schema,
then runs the reference here. The references are kiln's reading of torch_npu's operator
documentation (the wheel's `_op_plugin_docs.py`), for the layouts and modes kiln uses;
they say what kiln relies on, not what the hardware does, which no machine here can tell.
"""
from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

# Where `make setup` puts the schema file (Makefile: NPU_SCHEMAS).
SCHEMA_FILE = Path(sys.prefix) / "torch-npu-schemas" / "npu_native_functions_by_codegen.yaml"
VERSION_FILE = SCHEMA_FILE.with_name("VERSION")

calls: Counter = Counter()   # operator name -> calls since register()
_library = None


def schemas(path: Path = SCHEMA_FILE) -> dict[str, str]:
    """Operator name (overload-free) -> its schema line from torch_npu's declarations."""
    out = {}
    for m in re.finditer(r"func:\s*(\w+)(\([^\n]*)", path.read_text()):
        out.setdefault(m.group(1), m.group(1) + m.group(2).rstrip())
    return out


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def npu_rms_norm(self, gamma, epsilon=1e-6):
    xf = self.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(self.dtype), rstd


def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-6):
    summed = x1 + x2
    y, rstd = npu_rms_norm(summed, gamma, epsilon)
    return y, rstd, summed


def npu_rotary_mul(self, r1, r2, rotary_mode="half", rotate=None):
    assert rotary_mode == "half" and rotate is None, "only the rotate-half mode is referenced"
    return (self * r1 + _rotate_half(self) * r2).to(self.dtype)


def npu_swiglu(self, dim=-1):
    gate, up = self.chunk(2, dim=dim)
    return (F.silu(gate.float()) * up.float()).to(self.dtype)


def _attend(q, k, v, scale, hidden=None, pse=None):
    """q [N, Sq, D], k, v [Nkv, Skv, D] -> [N, Sq, D]; hidden: bool, True = masked out."""
    groups = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(groups, 0).float()
    v = v.repeat_interleave(groups, 0).float()
    scores = q.float() @ k.transpose(-1, -2) * scale
    if pse is not None:
        scores = scores + pse.float()
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, -1), nan=0.0) @ v


def npu_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None,
                                    actual_seq_lengths=None, actual_seq_lengths_kv=None,
                                    block_table=None, num_heads=1, scale=1.0,
                                    input_layout="BSH", num_key_value_heads=0, sparse_mode=0,
                                    block_size=0, softmax_lse_flag=False, **unused):
    """The layouts kiln uses: BNSD (dense q/k/v, sparse_mode 0 with a full mask or none),
    and BSH over a paged cache (key/value [blocks, block_size, Hkv * D], block_table,
    actual_seq_lengths_kv; a query of several tokens with sparse_mode 3: bottom-right
    causal)."""
    used = {k for k, v in unused.items() if v not in (None, 0, 0.0, False, 2147483647)}
    assert not used, f"reference does not model {sorted(used)}"
    nkv = num_key_value_heads or num_heads
    if input_layout == "BNSD":
        assert block_table is None and sparse_mode == 0
        b, n, sq, d = query.shape
        hidden = None if atten_mask is None else atten_mask.expand(b, n, sq, key.shape[2])
        pse = None if pse_shift is None else pse_shift.expand(b, n, sq, key.shape[2])
        out = torch.stack([_attend(query[i], key[i], value[i], scale,
                                   None if hidden is None else hidden[i],
                                   None if pse is None else pse[i]) for i in range(b)])
        return out.to(query.dtype), torch.zeros(1)
    assert input_layout == "BSH" and block_table is not None and pse_shift is None
    b, sq, h = query.shape
    d = h // num_heads
    out = torch.zeros(b, sq, h, dtype=query.dtype)
    for i in range(b):
        length = actual_seq_lengths_kv[i]
        blocks = block_table[i, : -(-length // block_size)].long()
        k = key[blocks].reshape(-1, nkv, d)[:length].transpose(0, 1)
        v = value[blocks].reshape(-1, nkv, d)[:length].transpose(0, 1)
        q = query[i].view(sq, num_heads, d).transpose(0, 1)
        hidden = None
        if sq > 1:   # Q_S == 1 ignores the mode and the mask
            assert sparse_mode == 3 and atten_mask.shape[-2:] == (2048, 2048)
            nq = actual_seq_lengths[i] if actual_seq_lengths is not None else sq
            assert nq == sq
            hidden = torch.ones(sq, length, dtype=torch.bool).tril(length - sq).logical_not()
        o = _attend(q, k, v, scale, hidden)
        out[i] = o.transpose(0, 1).reshape(sq, h).to(query.dtype)
    return out, torch.zeros(1)


def npu_moe_gating_top_k_softmax(x, finished=None, k=1):
    assert finished is None
    weights, ids = torch.softmax(x.float(), -1).topk(k, -1)
    t = x.shape[0]
    row_idx = torch.arange(t * k, dtype=torch.int32).view(k, t).t().contiguous()
    return weights, ids.to(torch.int32), row_idx


def npu_moe_init_routing(x, row_idx, expert_idx, active_num):
    """Rows sorted by expert (stably, by source row j * T + t within one expert);
    expanded_row_idx[src] is where source row src went."""
    t, k = expert_idx.shape
    src_expert = expert_idx.t().reshape(-1).long()                 # by source row j * T + t
    order = torch.sort(src_expert * (t * k) + torch.arange(t * k)).indices   # dst -> src
    expanded_row_idx = torch.empty(t * k, dtype=torch.int32)
    expanded_row_idx[order] = torch.arange(t * k, dtype=torch.int32)
    expanded_x = x[order % t]
    return expanded_x, expanded_row_idx, src_expert[order].to(torch.int32)


def npu_grouped_matmul(x, weight, *, bias=None, group_list=None, split_item=0, group_type=None,
                       group_list_type=0, **unused):
    assert len(x) == 1 and split_item in (2, 3) and group_type == 0 and group_list_type == 0
    assert bias is None and not any(v for v in unused.values() if v not in (None, 0))
    rows, w = x[0], weight[0]
    out = torch.zeros(rows.shape[0], w.shape[-1], dtype=rows.dtype)
    start = 0
    for e, end in enumerate(group_list.tolist()):
        out[start:end] = (rows[start:end].float() @ w[e].float()).to(rows.dtype)
        start = end
    return [out]


def npu_moe_finalize_routing(expanded_permuted_rows, skip1, skip2, bias, scales,
                             expanded_src_to_dst_row, export_for_source_row, drop_pad_mode=0, k=1):
    assert skip1 is None and skip2 is None and bias is None and drop_pad_mode == 0
    t, topk = scales.shape
    dst = expanded_src_to_dst_row.long().view(topk, t)             # [j, t]
    rows = expanded_permuted_rows[dst].float()                       # [k, T, H]
    return (rows * scales.t().float()[..., None]).sum(0).to(expanded_permuted_rows.dtype)


def npu_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None,
                      quant_mode="pertoken", dst_type_max=0.0):
    assert smooth_scales is None and group_index is None and dst_type is None
    assert quant_mode == "pertoken"
    scale = input.float().abs().amax(-1).clamp(min=1e-10) / 127.0
    q = (input.float() / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


REFERENCES = {f.__name__: f for f in (
    npu_rms_norm, npu_add_rms_norm, npu_rotary_mul, npu_swiglu, npu_fused_infer_attention_score,
    npu_moe_gating_top_k_softmax, npu_moe_init_routing, npu_grouped_matmul,
    npu_moe_finalize_routing, npu_dynamic_quant)}


def _counted(name, fn):
    def run(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    return run


def register(path: Path = SCHEMA_FILE) -> dict[str, str]:
    """Defines torch.ops.npu.<op> for each reference, with torch_npu's schema from `path`;
    returns those schemas. Once per process (torch.library keeps definitions)."""
    global _library
    declared = schemas(path)
    used = {name: declared[name] for name in REFERENCES}
    if _library is None:
        _library = torch.library.Library("npu", "DEF")
        for name, schema in used.items():
            _library.define(schema)
            _library.impl(name, _counted(name, REFERENCES[name]), "CompositeExplicitAutograd")
    return used
