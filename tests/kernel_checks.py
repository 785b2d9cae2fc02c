"""What the Triton kernel tests share: where kernels run (the GPU, or the CPU under
TRITON_INTERPRET=1, as `make test` sets it), the dtypes and bounds they are checked at,
and the relative-error check against the reference."""
from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET") else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# The interpreter has no bf16 arithmetic; bf16 runs only on a GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def require_triton() -> None:
    """Skips the calling test module where kernels can neither run nor be interpreted."""
    if DEVICE == "cpu" and not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)


def randn(*shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(dtype).to(DEVICE)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; both must be finite and of one shape."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values in kernel output"
    assert torch.isfinite(ref).all()
    return ((out - ref).norm() / ref.norm()).item()


def assert_close(out, ref, dtype, tol=None) -> None:
    """Same dtype, and a relative error under the dtype's bound (or `tol`, if larger)."""
    assert out.dtype == ref.dtype, (out.dtype, ref.dtype)
    err = rel_err(out, ref)
    tol = max(TOL[dtype], tol or 0)
    assert err < tol, f"relative error {err:.3g} >= {tol}"
