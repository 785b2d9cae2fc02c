"""Every architecture family of the CPU suite (tests/families.py) with target="cuda" in
bf16 on a real GPU: the StaticCache loop, logits within the bf16 bound against fp32 eager
on the same rounded weights, CUDA graphs replayed, no fallback (KILN_FALLBACK=error).
Skipped without CUDA; `make test-gpu` runs it."""
from __future__ import annotations

import pytest
import torch

import kiln
from capture import bf16_bound, bf16_pair, fresh_dynamo, greedy_inputs, rel_err, run_steps
from families import FAMILIES, VOCAB, build

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_bf16_on_cuda_matches_fp32_eager(name):
    kiln.stats(reset=True)
    model, ref_model = bf16_pair(build(name))
    ids = torch.randint(0, VOCAB, (2, 9), device="cuda")
    ref = run_steps(ref_model, ref_model, ids.clone(), 6)
    teacher = greedy_inputs(ref)
    eager = run_steps(model, model, ids.clone(), 6, teacher=teacher)
    compiled = []
    fresh_dynamo()
    fn = torch.compile(model, backend="kiln", options={"target": "cuda",
                                                       "observer": compiled.append})
    out = run_steps(fn, model, ids.clone(), 6, teacher=teacher)
    errs = [rel_err(o.float(), r) for o, r in zip(out, ref)]
    eager_errs = [rel_err(o.float(), r) for o, r in zip(eager, ref)]
    print(f"{name}: kiln {max(errs):.2e}, eager bf16 {max(eager_errs):.2e}, "
          f"replays {[c.replays for c in compiled]}")
    assert compiled, "nothing was compiled by kiln"
    assert max(errs) < bf16_bound(eager_errs), errs
    assert any(c.replays > 0 for c in compiled), "no CUDA graph was replayed"
    assert kiln.stats()["fallbacks"] == 0
