"""A graph kiln cannot capture runs eagerly, loudly and counted; `fallback="error"` (or
KILN_FALLBACK=error, which the test suite sets) raises instead."""
from __future__ import annotations

import pytest
import torch

import kiln
from kiln.ir.fallback import FallbackError, KilnFallbackWarning


def uncapturable(x):
    # kiln's IR has no complex128: the capture cannot type this graph.
    return (x.to(torch.complex128) * 2).real.float()


def test_fallback_warns_names_the_cause_and_counts(fallback_warns):
    torch._dynamo.reset()
    fn = torch.compile(uncapturable, backend="kiln")
    x = torch.randn(4, 8)
    with pytest.warns(KilnFallbackWarning, match=r"complex128.*runs eagerly"):
        out = fn(x)
    torch.testing.assert_close(out, uncapturable(x))
    stats = kiln.stats()
    assert stats["fallbacks"] == 1 and stats["by_kind"] == {"graph": 1}
    assert "complex128" in stats["events"][0]


@pytest.mark.parametrize("how", ["option", "env"])
def test_fallback_error_raises(how, monkeypatch):
    torch._dynamo.reset()
    if how == "option":
        monkeypatch.delenv("KILN_FALLBACK", raising=False)
        fn = torch.compile(uncapturable, backend="kiln", options={"fallback": "error"})
    else:
        monkeypatch.setenv("KILN_FALLBACK", "error")
        fn = torch.compile(uncapturable, backend="kiln")
    # dynamo wraps what a backend raises; the FallbackError's message is kept whole.
    with pytest.raises(Exception, match=f"{FallbackError.__name__}: kiln: cannot capture this "
                                        f"graph .*complex128.*fallback=error"):
        fn(torch.randn(4, 8))


def test_bad_fallback_policy_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("KILN_FALLBACK", raising=False)
    with pytest.raises(ValueError, match="fallback policy must be one of warn, error"):
        kiln.compile(lambda x: x, fallback="sometimes")
