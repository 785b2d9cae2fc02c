"""TVM as the CPU target's code generator: fused kiln ops and one quantised GEMV written in
TVM's tensor expressions (TE), scheduled by hand (vectorised along the contiguous dim,
parallel over output rows where there are enough of them), compiled by TVM's LLVM backend
for this machine's CPU, cached on disk, and called on torch tensors through DLPack with
no copies (`kernels.py` says what each computes; `build.py` how modules are built and
cached).

TVM is the optional `cpu` extra (`pip install 'kiln[cpu]'`). Without it the CPU target runs
these ops as torch code, as it did before TVM (`kiln.backends.cpu_kernels`), with one
warning naming the extra; `kiln.backends.tvm.counts()` says which path each op took.
"""
from __future__ import annotations

from .build import available, counts, require

__all__ = ["available", "counts", "require"]
