"""The grids a Triton kernel is launched with, for tests of a launcher's decisions."""
from __future__ import annotations


def record_launches(monkeypatch, kernel) -> list:
    """A list that collects the grid of every launch of `kernel` (other kernels run as usual)."""
    grids = []
    kernel_class = type(kernel)
    launch = kernel_class.__getitem__

    def recording(self, grid):
        if self is kernel:
            grids.append(grid)
        return launch(self, grid)
    monkeypatch.setattr(kernel_class, "__getitem__", recording)
    return grids
