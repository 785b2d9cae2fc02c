"""Prepared weights at run time: `prepare_weights` (passes/weight_prep.py) runs once per
set of weight tensors, and again only when one of them is replaced or written in place.

A generated wrapper with a weight preparation keeps one `PreparedWeights` and calls
`forward_prepared(*inputs, *prepared(inputs))`. The cache holds the weight tensors
themselves (identity, not `id()`, which a freed tensor's successor can reuse) and their
version counters. The prepared tensors are new memory beside the weights (the q/k/v and
gate/up concatenations are most of a dense model's layer weights), as long as both live.
"""
from __future__ import annotations

import torch


def _version(t) -> int | None:
    try:
        return t._version
    except (AttributeError, RuntimeError):   # not a tensor, or an inference-mode tensor
        return None


class PreparedWeights:
    def __init__(self, prepare, positions: tuple[int, ...]):
        self.prepare = prepare
        self.positions = positions
        self._weights: list | None = None
        self._versions: list | None = None
        self._values: tuple = ()
        self.runs = 0

    def __call__(self, inputs) -> tuple:
        weights = [inputs[i] for i in self.positions]
        if (self._weights is None or any(a is not b for a, b in zip(weights, self._weights))
                or [_version(w) for w in weights] != self._versions):
            with torch.no_grad():
                self._values = tuple(self.prepare(*weights))
            self._weights, self._versions = weights, [_version(w) for w in weights]
            self.runs += 1
        return self._values
