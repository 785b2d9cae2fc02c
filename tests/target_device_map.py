"""TEST ONLY: run a wrapper generated for a device this machine lacks (xpu, npu) on the CPU.

A serving wrapper compiled for such a target names its device in literals
(`torch.device('npu')`: kiln.serving.retarget_devices points them at the target's device).
`wrapper_on_cpu` loads the same source with exactly those literals mapped to the CPU, and
nothing else changed, so every other line the target runs (its kernel imports and calls,
the host code around them) runs here. Never used outside tests: on the hardware the
wrapper runs as generated.
"""
from __future__ import annotations

from kiln.backends import wrapper


def map_device_to_cpu(source: str, device_type: str) -> str:
    """`source` with its `torch.device('<device_type>')` literals made CPU ones (a serving
    graph whose tensors all come in as inputs has none)."""
    return source.replace(f"torch.device({device_type!r})", "torch.device('cpu')")


def wrapper_on_cpu(source: str, device_type: str):
    """The wrapper's `forward`, with its `device_type` literals mapped to the CPU."""
    return wrapper.load(map_device_to_cpu(source, device_type), f"kiln_{device_type}_on_cpu")
