"""Collectives as the compiled wrapper runs them: torch.distributed's functional collectives
(`torch.ops._c10d_functional.*` followed by `wait_tensor`) on the default process group.

Functional collectives return a new tensor and are ordinary ops to the CUDA caching
allocator and to stream capture, so a CUDA graph captures them (NCCL); on the CPU they run
on gloo. Semantics are kiln_ref's (all_reduce, all_gather, reduce_scatter,
all_reduce_add_rms_norm); these differ only in calling the ops directly, with the group's
name looked up once per process, and in building all_gather / reduce_scatter along any dim
from the dim-0 forms (a copy when dim is not 0).
"""
from __future__ import annotations

import torch

from kiln.ir import kiln_ref

_c10d = torch.ops._c10d_functional
_group_names: dict[int, str] = {}


def _group_name(world_size: int) -> str:
    name = _group_names.get(world_size)
    if name is None:
        name = _group_names[world_size] = kiln_ref.process_group(world_size).group_name
    return name


def all_reduce(x: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size == 1:
        return x
    return _c10d.wait_tensor(_c10d.all_reduce(x, "sum", _group_name(world_size)))


def all_gather(x: torch.Tensor, dim: int, world_size: int) -> torch.Tensor:
    if world_size == 1:
        return x
    dim %= x.dim()
    out = _c10d.wait_tensor(_c10d.all_gather_into_tensor(x.contiguous(), world_size,
                                                         _group_name(world_size)))
    if not dim:
        return out
    # [N * x0, ...] in rank order -> [..., N, d, ...] -> the ranks' chunks side by side
    out = out.reshape(world_size, *x.shape).movedim(0, dim)
    return out.reshape(*x.shape[:dim], world_size * x.shape[dim], *x.shape[dim + 1:])


def reduce_scatter(x: torch.Tensor, dim: int, world_size: int) -> torch.Tensor:
    if world_size == 1:
        return x
    dim %= x.dim()
    chunk = x.shape[dim] // world_size
    # rank r's chunk along `dim` -> rows r * chunk .. of a dim-0-major copy
    src = x.reshape(*x.shape[:dim], world_size, chunk, *x.shape[dim + 1:]).movedim(dim, 0)
    out = _c10d.wait_tensor(_c10d.reduce_scatter_tensor(src.contiguous(), "sum", world_size,
                                                        _group_name(world_size)))
    return out.reshape(src.shape[1:])


def all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            eps: float, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The collective, then the reference fused_add_rms_norm (the cpu target's)."""
    return kiln_ref.fused_add_rms_norm(all_reduce(x, world_size), residual, weight, eps)


def all_reduce_add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                   eps: float, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The collective (NCCL), then the Triton fused_add_rms_norm kernel (cuda, hip)."""
    from kiln.backends.triton.norm import fused_add_rms_norm
    return fused_add_rms_norm(all_reduce(x, world_size), residual, weight, eps)
