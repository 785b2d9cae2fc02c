"""Which tile tables a launch reads: the cuda ones (tuned on an H100/H200, up to 224 KiB of
shared memory), or on a ROCm build of torch the hip ones, sized for MI300 (gfx942): 64 KiB
of LDS per workgroup and 64-wide waves. Triton compiles a kernel for gfx942 whatever its
LDS use; only a launch on the GPU would refuse it, so tests/backends/test_target_hip.py
checks every hip variant's shared memory against HIP_LDS_BYTES at compile time.

A kernel module keeps both tables beside each other; `on_hip()` picks at launch, and its
AOT variants ship a separate hip spec (named `..._hip`) wherever the hip tiles differ."""
from __future__ import annotations

import torch

HIP_LDS_BYTES = 64 * 1024   # MI300X/MI300A (gfx942) LDS per workgroup; gfx950 has 160 KiB


def on_hip() -> bool:
    """Running on a ROCm build of torch (whose GPUs are "cuda" devices)."""
    return torch.version.hip is not None


def variants(make, cuda_cfg, hip_cfg, targets=("cuda", "hip")) -> list:
    """AOT specs of one variant: make(cfg, targets, suffix) once for every target when the
    tiles agree, else a cuda spec and a hip spec (suffix "_hip")."""
    if cuda_cfg == hip_cfg or "hip" not in targets:
        return [make(cuda_cfg, tuple(targets), "")]
    if targets == ("hip",):
        return [make(hip_cfg, ("hip",), "")]
    rest = tuple(t for t in targets if t != "hip")
    return [make(cuda_cfg, rest, ""), make(hip_cfg, ("hip",), "_hip")]
