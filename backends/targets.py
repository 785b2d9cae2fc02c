"""Targets as data: one entry per hardware target; everything else derives from this table.

`kernels` maps each fused kiln op to the function that implements it on the target
("module:function"); an op with no entry runs its reference implementation from
`kiln.ir.kiln_ref`. `status` is what the README's support matrix says.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Target:
    name: str
    device_type: str
    triton_backend: str | None = None         # GPUTarget backend name
    archs: tuple = ()                          # GPUTarget archs: sm as int, gfx as str
    warp_size: int = 32
    fp8_dtype: torch.dtype | None = None
    graph_capture: str | None = None           # the graph API the runtime replays
    kernels: dict[str, str] = field(default_factory=dict)
    status: str = "runs"
    # fuse.parallel_linear: one GEMM for q/k/v and for gate/up saves launches, which a GPU
    # decode step is bound by; a CPU's batch-1 GEMV streams the same weight bytes either
    # way, so there it buys nothing and costs a copy of those weights.
    merge_parallel_linears: bool = True
    # quant="int4_weight_only": the dtype of each group's (scale, zero) that the target's
    # kiln.weight_int4_mm reads (torch's CPU int4 GEMM: its activations' dtype, bf16).
    int4_scale_dtype: torch.dtype = torch.float32

    def kernel(self, op: str) -> str:
        """"module:function" implementing kiln op `op` (e.g. "kiln.rms_norm")."""
        short = op.split(".", 1)[1]
        return self.kernels.get(short, f"kiln.ir.kiln_ref:{short}")

    def describe(self) -> str:
        arch = ", ".join(str(a) for a in self.archs) or "-"
        fp8 = str(self.fp8_dtype).replace("torch.", "") if self.fp8_dtype else "-"
        return (f"{self.name:5s} device={self.device_type:4s} triton={self.triton_backend or '-':5s} "
                f"archs=[{arch}] warp={self.warp_size} fp8={fp8} capture={self.graph_capture or '-'} "
                f"status={self.status}")


# Collectives run as torch.distributed functional collectives on every target that runs.
_COLLECTIVES = {op: f"kiln.backends.collectives:{op}"
                for op in ("all_reduce", "all_gather", "reduce_scatter", "all_reduce_add_rms_norm")}
_CPU_KERNELS = {"attention": "kiln.backends.cpu_kernels:attention",
                "weight_int8_mm": "kiln.backends.cpu_kernels:weight_int8_mm",
                "quant_int4": "kiln.backends.cpu_kernels:quant_int4",
                "weight_int4_mm": "kiln.backends.cpu_kernels:weight_int4_mm",
                "paged_attention": "kiln.backends.paged_attention:paged_attention",
                **_COLLECTIVES}
# Triton modules and the fused ops each implements (launcher named like the op).
_TRITON_MODULES = {
    "norm": ("rms_norm", "fused_add_rms_norm"),
    "rope": ("rope", "rope_pair", "rope_pair_store"),
    "activation": ("silu_mul",),
    "attention": ("attention",),
    "paged_attention": ("paged_attention",),
    "moe": ("fused_moe",),
    "quant": ("quant_fp8", "quant_int8", "rms_norm_quant", "fused_add_rms_norm_quant",
              "silu_mul_quant"),
    "gemm": ("scaled_mm",),
    "gemv": ("rms_norm_mm", "fused_add_rms_norm_mm", "silu_mul_mm", "mm"),
}
_TRITON_KERNELS = {op: f"kiln.backends.triton.{module}:{op}"
                   for module, ops in _TRITON_MODULES.items() for op in ops}
_TRITON_KERNELS.update(_COLLECTIVES, all_reduce_add_rms_norm=
                       "kiln.backends.collectives:all_reduce_add_rms_norm_triton")

TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("cpu", "cpu", kernels=_CPU_KERNELS, merge_parallel_linears=False,
           int4_scale_dtype=torch.bfloat16),
    Target("cuda", "cuda", "cuda", (80, 90), 32, torch.float8_e4m3fn, "torch.cuda.CUDAGraph",
           kernels=_TRITON_KERNELS),
    Target("hip", "cuda", "hip", ("gfx942", "gfx950"), 64, torch.float8_e4m3fnuz,
           "torch.cuda.CUDAGraph (HIP graphs on ROCm builds)", kernels=_TRITON_KERNELS,
           status="compiles, not run"),
    Target("xpu", "xpu", "xpu", (), 16, torch.float8_e4m3fn, "torch.xpu.XPUGraph",
           status="not yet lowered"),
    Target("npu", "npu", None, (), 32, None, "torch.npu.NPUGraph", status="not yet lowered"),
]}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)} "
                         f"(`kiln targets` lists them)") from None
