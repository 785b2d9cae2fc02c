"""kiln's optional dependencies: which extra of the `kiln` distribution provides what.

The core install (`pip install kiln`) compiles for the CPU and runs the serving engine
offline (`kiln compile -t cpu`, `kiln generate`, `torch.compile(backend="kiln")`). A
feature that needs more calls `require(extra, feature)` before importing it, so a missing
package is one message naming the extra to install rather than a ModuleNotFoundError
from deep inside kiln. pyproject.toml's `[project.optional-dependencies]` declares the
same extras (tests/packaging/test_wheel.py keeps the two in step).
"""
from __future__ import annotations

import importlib.util

# extra -> the modules a feature of that extra imports (the extra may hold more, e.g. rich
# for the progress display, which kiln uses when present and goes without otherwise).
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "starlette", "uvicorn"),   # kiln serve: the HTTP server
    "bench": ("httpx",),                            # kiln bench serve: the load generator
    "gguf": ("gguf", "accelerate"),                 # reading GGUF files (the default model)
    "triton": ("triton",),                          # Triton kernels: targets cuda and hip
    "mlir": ("torch_mlir",),                        # kiln dump --format mlir
    "cpu": ("tvm",),                                # the cpu target's TVM kernels
}


class MissingExtra(ImportError):
    """A feature's optional dependencies are not installed; the message says which extra
    to install. An ImportError, so callers that handle missing modules handle this too."""


def require(extra: str, feature: str) -> None:
    """Raises MissingExtra unless every module of `extra` can be imported."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"{feature} needs the {extra!r} extra ({', '.join(missing)} "
                           f"not installed): pip install 'kiln[{extra}]'", name=missing[0])
