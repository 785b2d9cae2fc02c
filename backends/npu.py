"""The npu target (Ascend): kiln's fused ops as torch_npu operators.

Every function here implements one kiln op (its signature and semantics are
`kiln.ir.kiln_ref`'s) with the operators torch_npu registers under `torch.ops.npu`;
the targets table points the npu wrapper's imports here. Whatever these functions do not
call is plain torch, which torch_npu runs on the device.

Operators are looked up when first called, not at import: `kiln compile -t npu` runs on
any machine (it writes the wrapper, it does not run it), while running it needs torch_npu,
and so Ascend's CANN toolkit. No machine here has either, so CI checks every call below
against the operator schemas of the torch-npu wheel and runs it on the CPU against
reference implementations of those operators (tests/npu_reference_ops.py,
tests/backends/test_target_npu.py); that is what the npu row of the targets table says.

Kernels of the `schedule` pass do not go through triton-ascend: it installs its own
`triton` package in place of the one the cuda/hip targets compile with, and compiles
through CANN's BiSheng compiler, which no registry here ships. So the npu target has no
kernel generator, and the schedule pass's groups run as torch code on the device.
"""
from __future__ import annotations

import torch

from kiln.ir import kiln_ref

from .paged_attention import paged_attention as torch_paged_attention
from .paged_attention import write_cache

_REQUIRED = "npu_rms_norm"   # an operator every torch_npu this module supports registers
_ops = None


def npu_ops():
    """`torch.ops.npu`, once torch_npu (or a test's reference operators) registered it."""
    global _ops
    if _ops is None:
        if not hasattr(torch.ops.npu, _REQUIRED):
            try:
                import torch_npu  # noqa: F401  registers torch.ops.npu and the "npu" device
            except (ImportError, OSError) as e:   # not installed; CANN's libraries missing
                raise ImportError(
                    f"target npu runs torch_npu operators, and importing torch_npu failed "
                    f"({e}): install the torch-npu release built for torch {torch.__version__} "
                    f"and source Ascend's CANN set_env.sh, or compile for another target "
                    f"(kiln targets)") from None
        _ops = torch.ops.npu
    return _ops


def declare_device(to_run: bool = False) -> torch.device:
    """torch.device("npu"). torch_npu names torch's privateuse1 backend "npu" when imported;
    where torch_npu is missing (compiling on a machine without an NPU), kiln gives it the
    same name, so that graphs and artifacts for npu can name their device. torch_npu,
    imported later in the same process, gives the same name again, which torch allows.
    Torch then takes "npu" for the process's accelerator, which breaks dynamo's capture:
    name it only after capturing (kiln.serving does). `to_run`: the operators must be
    there too (npu_ops: torch_npu, or one error naming what to install)."""
    if to_run:
        npu_ops()
    try:
        return torch.device("npu")
    except RuntimeError:
        pass
    try:
        import torch_npu  # noqa: F401
    except (ImportError, OSError):   # not installed, or installed without CANN's libraries
        torch.utils.rename_privateuse1_backend("npu")
    return torch.device("npu")


def rms_norm(x, weight, eps):
    return npu_ops().npu_rms_norm(x, weight, eps)[0]


def fused_add_rms_norm(x, residual, weight, eps):
    normed, _rstd, summed = npu_ops().npu_add_rms_norm(residual, x, weight, eps)
    return normed, summed


def rope(x, cos, sin):
    # x [B, H, S, D]; cos, sin [B, S, D] broadcast over the heads.
    return npu_ops().npu_rotary_mul(x, cos.unsqueeze(1), sin.unsqueeze(1), "half")


def rope_pair(q, k, cos, sin):
    # npu_apply_rotary_pos_emb rotates both at once but only in the BSND layout (and in
    # place); kiln's q and k are BNSD, so two rotary_mul calls avoid two transposes.
    return rope(q, cos, sin), rope(k, cos, sin)


def silu_mul(gate, up):
    # npu_swiglu takes [gate | up] along its last dim (silu of the first half times the
    # second): one concatenation here, which a merged gate/up GEMM's output already is.
    return npu_ops().npu_swiglu(torch.cat([gate, up], dim=-1), -1)


def _hidden_keys(sq: int, skv: int, causal: bool, window, mask, device):
    """torch_npu's atten_mask (True = masked out) for kiln's causal/window/bool mask, or
    None when every key is visible."""
    keep = kiln_ref.visible_keys(sq, skv, causal, window, device)
    if mask is not None and mask.dtype == torch.bool:
        keep = mask if keep is None else (mask & keep)
    if keep is None:
        return None
    while keep.dim() < 4:   # [Sq, Skv] -> [1, 1, Sq, Skv], a shape the operator takes
        keep = keep.unsqueeze(0)
    return ~keep


def attention(q, k, v, mask, scale, causal, window=None):
    """Prefill (Sq > 1) and incremental decode (Sq == 1) alike: the operator picks its
    prompt or incremental kernel from the query length. An additive float mask is its
    `pse_shift` (added to the scaled scores, [B or 1, Hq, Sq, Skv])."""
    b, hq, sq, _ = q.shape
    hidden = _hidden_keys(sq, k.shape[2], causal, window, mask, q.device)
    pse = None
    if mask is not None and mask.dtype != torch.bool:
        pse = mask.to(q.dtype).expand(mask.shape[0] if mask.dim() == 4 else 1, hq, sq, k.shape[2])
        pse = pse.contiguous()
    out, _lse = npu_ops().npu_fused_infer_attention_score(
        q, k, v, pse_shift=pse, atten_mask=hidden, num_heads=hq, scale=scale,
        input_layout="BNSD", num_key_value_heads=k.shape[1], sparse_mode=0)
    return out


# The host argument of paged decode attention that an ACL graph gets before each replay.
_DECODE_LENGTHS = "actual_seq_lengths_kv"


def _capturing() -> bool:
    """Inside an ACL graph capture (torch.npu exists once torch_npu is imported)."""
    npu_module = getattr(torch, "npu", None)
    return npu_module is not None and npu_module.is_current_stream_capturing()


def paged_attention(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                    query_start, scale, window=None):
    """kiln.paged_attention: the cache written with torch indexing, then the fused
    inference attention over the block table (its paged form, BSH layout): decode
    batches in one call, each prefill chunk in its own call (the operator's TND layout,
    which would take them all at once, has no paged form). A sliding window runs the
    torch version (the operator's band mode is not lowered).

    The operator takes the sequences' lengths as a host list. Under ACL graph capture
    (decode buckets only: kiln's runner never captures prefill on npu) reading them back
    would stop the capture, and the graph would keep them anyway: the capture passes the
    block table's full width (the workspace torch_npu sizes then fits every later step),
    and the runner gives each replay its step's lengths (`graph_host_arguments`,
    NPUGraph.update)."""
    if window is not None:
        return torch_paged_attention(q, k, v, k_cache, v_cache, slot_mapping, block_tables,
                                     context_lens, query_start, scale, window)
    write_cache(k, v, k_cache, v_cache, slot_mapping)
    num_blocks, block_size, hkv, d = k_cache.shape
    t, hq, _ = q.shape
    n = context_lens.shape[0]
    keys = k_cache.view(num_blocks, block_size, hkv * d)
    values = v_cache.view(num_blocks, block_size, hkv * d)
    fia = npu_ops().npu_fused_infer_attention_score
    common = dict(num_heads=hq, num_key_value_heads=hkv, scale=scale, input_layout="BSH",
                  block_size=block_size)
    capturing = _capturing()
    if t == n:   # one new token a sequence
        lengths = ([block_tables.shape[1] * block_size] * n if capturing
                   else context_lens.tolist())
        out, _ = fia(q.reshape(n, 1, hq * d), keys, values, block_table=block_tables,
                     **{_DECODE_LENGTHS: lengths}, **common)
        return out.view(t, hq, d)
    if capturing:
        raise RuntimeError("kiln's npu paged attention reads a batch with prefill chunks on "
                           "the host, which an ACL graph cannot capture: capture decode "
                           "batches only (the npu target's graph_captures_prefill=False)")
    lengths = context_lens.tolist()
    out = torch.zeros_like(q)
    starts = query_start.tolist()
    for i, length in enumerate(lengths):
        lo, hi = starts[i], starts[i + 1]
        if hi == lo:
            continue
        # rightDownCausal: the new tokens are the last hi - lo of the context; the mask is
        # the operator's fixed 2048 x 2048 upper triangle.
        o, _ = fia(q[lo:hi].reshape(1, hi - lo, hq * d), keys, values,
                   block_table=block_tables[i:i + 1], actual_seq_lengths=[hi - lo],
                   actual_seq_lengths_kv=[length], atten_mask=causal_mask_2048(q.device),
                   sparse_mode=3, **common)
        out[lo:hi] = o.view(hi - lo, hq, d)
    return out


def graph_host_arguments(context_lens: list[int]) -> list[dict]:
    """NPUGraph.update's input before a replay of a decode bucket captured with
    auto_dispatch_capture: the step's sequence lengths (the bucket's scratch sequences
    included) for every fused attention call the graph recorded. torch_npu 2.14 gives a
    one-entry list to each recorded call (every layer's attention sees the same lengths)."""
    return [{_DECODE_LENGTHS: context_lens}]


_CAUSAL_2048: dict = {}


def causal_mask_2048(device) -> torch.Tensor:
    """The compressed mask torch_npu's sparse modes 2-4 take: 2048 x 2048, True above the
    diagonal."""
    key = str(device)
    if key not in _CAUSAL_2048:
        _CAUSAL_2048[key] = torch.ones(2048, 2048, dtype=torch.bool, device=device).triu(1)
    return _CAUSAL_2048[key]


def fused_moe(x, router_logits, w_gate_up, w_down, top_k, renormalize, expert_start=0):
    """Gating (softmax top-k), routing (tokens sorted by expert), two grouped matmuls with
    SwiGLU between them, and the weighted sum back per token. A rank holding a slice of
    the experts (expert parallelism) runs the reference instead (its routing would need
    the operators' expert-range options, not lowered)."""
    num_experts = router_logits.shape[-1]
    if expert_start != 0 or w_gate_up.shape[0] != num_experts:
        return kiln_ref.fused_moe(x, router_logits, w_gate_up, w_down, top_k, renormalize,
                                  expert_start)
    ops = npu_ops()
    t = x.shape[0]
    weights, expert_ids, row_ids = ops.npu_moe_gating_top_k_softmax(router_logits, None, top_k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    rows, expanded_row_ids, expanded_expert_ids = ops.npu_moe_init_routing(
        x, row_ids, expert_ids, t)
    # Rows per expert, as the cumulative counts grouped matmul's group_list_type=0 reads.
    group_list = torch.bincount(expanded_expert_ids.long(), minlength=num_experts).cumsum(0)
    gate_up = ops.npu_grouped_matmul([rows], [w_gate_up.transpose(1, 2)], group_list=group_list,
                                     split_item=2, group_type=0, group_list_type=0)[0]
    act = ops.npu_swiglu(gate_up, -1)
    down = ops.npu_grouped_matmul([act], [w_down.transpose(1, 2)], group_list=group_list,
                                  split_item=2, group_type=0, group_list_type=0)[0]
    out = ops.npu_moe_finalize_routing(down, None, None, None, weights.to(down.dtype),
                                       expanded_row_ids, expert_ids)
    return out.to(x.dtype)


def quant_int8(x):
    q, scale = npu_ops().npu_dynamic_quant(x)   # symmetric per token: scale [...]
    return q, scale.unsqueeze(-1)
