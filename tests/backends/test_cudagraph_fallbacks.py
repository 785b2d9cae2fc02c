"""GraphCache never stops capturing silently: non-tensor inputs that change on every
call (a Python int such as a sliding-window cache's length) would make a graph per call,
so after SCALAR_VARIANTS values for the same shapes it stops and reports one `cudagraph`
fallback naming the inputs. The decision comes before any capture: tested on the CPU."""
from __future__ import annotations

import pytest
import torch

import kiln
from kiln.backends.cudagraphs import SCALAR_VARIANTS, GraphCache
from kiln.ir.fallback import FallbackError, KilnFallbackWarning

STEPS = SCALAR_VARIANTS + 4


def test_non_tensor_inputs_that_never_repeat_are_reported_once(fallback_warns):
    cache = GraphCache(lambda n, m: n + m)
    with pytest.warns(KilnFallbackWarning, match=r"input\(s\) at \[0\] of this graph change"):
        assert [cache(step, 7) for step in range(STEPS)] == [step + 7 for step in range(STEPS)]
    assert cache.gave_up == {()} and not cache.first_ptrs
    assert kiln.stats()["by_kind"] == {"cudagraph": 1}


def test_a_few_values_are_no_fallback(fallback_warns):
    # (Seeing one again would capture it, which needs a GPU.)
    cache = GraphCache(lambda n: n)
    for step in range(SCALAR_VARIANTS):
        cache(step)
    assert not cache.gave_up and len(cache.first_ptrs) == SCALAR_VARIANTS
    assert kiln.stats()["fallbacks"] == 0


def test_host_tensor_inputs_run_without_graphs_quietly(fallback_warns):
    # A StaticCache prefill reads host tensors: prefill runs without graphs by design.
    cache = GraphCache(lambda x: (x * 2,))
    (out,) = cache(torch.ones(3))
    assert torch.equal(out, torch.full((3,), 2.0)) and kiln.stats()["fallbacks"] == 0


def test_under_fallback_error_it_raises():
    cache = GraphCache(lambda n: n, fallback="error")
    with pytest.raises(FallbackError, match="change on every call"):
        for step in range(STEPS):
            cache(step)
