"""CudaGraphCache never runs without graphs silently: host-tensor inputs and signatures that
never repeat (a Python int that changes every call) are reported once as `cudagraph`
fallbacks. Both decisions come before any capture, so they are tested on the CPU."""
from __future__ import annotations

import pytest
import torch

import kiln
from kiln.backends.cudagraphs import CudaGraphCache
from kiln.ir.fallback import FallbackError, KilnFallbackWarning


def test_signatures_that_never_repeat_are_reported_once(fallback_warns):
    cache = CudaGraphCache(lambda n, m: n + m, max_graphs=4)
    with pytest.warns(KilnFallbackWarning, match=r"input\(s\) at \[0\] change between calls"):
        assert [cache(step, 7) for step in range(10)] == [step + 7 for step in range(10)]
    assert cache.gave_up and len(cache.first_ptrs) == 4
    assert kiln.stats()["by_kind"] == {"cudagraph": 1}


def test_host_tensor_inputs_are_reported(fallback_warns):
    cache = CudaGraphCache(lambda x: (x * 2,))
    with pytest.warns(KilnFallbackWarning, match=r"input\(s\) \[0\] of this graph are host"):
        (out,) = cache(torch.ones(3))
    assert torch.equal(out, torch.full((3,), 2.0))
    assert kiln.stats()["fallbacks"] == 1


def test_under_fallback_error_they_raise():
    with pytest.raises(FallbackError, match="host tensors"):
        CudaGraphCache(lambda x: x, fallback="error")(torch.ones(1))
