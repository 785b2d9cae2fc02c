"""Prepared weights at run time: `prepare_weights` (passes/weight_prep.py) runs once per
set of weight tensors, and again only when one of them is replaced or written in place.

A generated wrapper with a weight preparation keeps one `PreparedWeights` and calls
`forward_prepared(*inputs, *prepared(inputs))`. The cache holds the weight tensors
themselves (identity, not `id()`, which a freed tensor's successor can reuse) and the
version counters of those it copies. The prepared tensors are new memory beside the weights (the q/k/v and
gate/up concatenations are most of a dense model's layer weights), as long as both live;
graphs whose preparations are the same code (a model's prefill and decode graphs) share
one copy: `share_key` names the code, and a PreparedWeights adopts the values another one
computed from the same weight tensors at the same versions.
"""
from __future__ import annotations

import operator
import weakref

import torch

from kiln.ir import timings

# share_key -> the PreparedWeights that last computed values under that key
_LAST: dict[str, "weakref.ref[PreparedWeights]"] = {}


def _version(t) -> int | None:
    try:
        return t._version
    except (AttributeError, RuntimeError):   # not a tensor, or an inference-mode tensor
        return None


_get_version = operator.attrgetter("_version")


def _getter(indices: tuple[int, ...]):
    """seq -> tuple(seq[i] for i in indices), in C (itemgetter returns a bare item for one
    index and fails for none)."""
    if not indices:
        return lambda seq: ()
    pick = operator.itemgetter(*indices)
    return pick if len(indices) > 1 else (lambda seq: (pick(seq),))


def _versions(weights: tuple) -> list:
    # This runs on every call of a compiled graph (a decode step's host time): map in C,
    # per-tensor handling only when some tensor has no version.
    try:
        return list(map(_get_version, weights))
    except (AttributeError, RuntimeError):
        return [_version(w) for w in weights]


class PreparedWeights:
    def __init__(self, prepare, positions: tuple[int, ...], copied: tuple[int, ...] = (),
                 share_key: str | None = None):
        """`positions`: the weights among the forward's inputs, in `prepare`'s order;
        `copied`: which of those `prepare` copies (their version counters are watched;
        a write to another one shows through the prepared view of it)."""
        self.prepare = prepare
        self.positions = positions
        self.copied = copied
        self._pick = _getter(positions)
        self._pick_copied = _getter(copied)
        self.share_key = share_key
        self._weights: list | None = None
        self._versions: list | None = None
        self._values: tuple = ()
        self.runs = 0          # times this instance ran `prepare`
        self.adopted = 0       # times it took another instance's values instead

    def _holds(self, weights: tuple, versions: list) -> bool:
        return (self._weights is not None and len(weights) == len(self._weights)
                and all(map(operator.is_, weights, self._weights))
                and versions == self._versions)

    def __call__(self, inputs) -> tuple:
        weights = self._pick(inputs)
        versions = _versions(self._pick_copied(weights))
        if self._holds(weights, versions):
            return self._values
        ref = _LAST.get(self.share_key) if self.share_key else None
        other = ref() if ref is not None else None
        if other is not None and other is not self and other._holds(weights, versions):
            self._values = other._values
            self.adopted += 1
        else:
            with torch.no_grad(), timings.phase("weight preparation"):
                self._values = tuple(self.prepare(*weights))
            self.runs += 1
            if self.share_key:
                _LAST[self.share_key] = weakref.ref(self)
        self._weights, self._versions = weights, versions
        return self._values
