"""Sampler: greedy is argmax, seeds reproduce, top-k / top-p never leave their allowed set."""
import pytest
import torch

from kiln.runtime import sampler
from kiln.runtime.sampler import make_generator, sample
from kiln.runtime.sequence import SamplingParams

V = 50


def logits(n, seed=0):
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    x = logits(8)
    assert sample(x, [SamplingParams(temperature=0)] * 8, [None] * 8) == x.argmax(-1).tolist()


def test_greedy_rows_mixed_with_sampled_rows():
    x = logits(6)
    params = [SamplingParams(temperature=0 if i % 2 else 1.0) for i in range(6)]
    out = sample(x, params, [None] * 6)
    assert [out[i] for i in (1, 3, 5)] == x.argmax(-1)[[1, 3, 5]].tolist()


def test_seeded_sampling_is_reproducible_whatever_the_batch():
    x = logits(1, seed=3)
    p = SamplingParams(temperature=1.0, seed=1234)
    alone = [sample(x, [p], [g])[0] for g in [make_generator(1234, x.device)] for _ in range(20)]
    # the same request next to others (unseeded and differently seeded), same draws in order
    g = make_generator(1234, x.device)
    other = make_generator(99, x.device)
    crowd = []
    for _ in range(20):
        batch = torch.cat([logits(2, seed=5), x])
        out = sample(batch, [SamplingParams(), SamplingParams(seed=99), p], [None, other, g])
        crowd.append(out[2])
    assert alone == crowd
    assert len(set(alone)) > 1                       # it does sample


def test_sampled_frequencies_follow_the_distribution():
    """20000 draws from one row: each token's frequency within 5 standard errors of its
    probability at temperature 0.7 (and zero-probability tokens never drawn)."""
    torch.manual_seed(0)
    x = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")]]).repeat(20000, 1)
    p = torch.softmax(x[0] / 0.7, -1)
    out = torch.tensor(sample(x, [SamplingParams(temperature=0.7)] * 20000, [None] * 20000))
    freq = torch.bincount(out, minlength=6).double() / 20000
    se = (p * (1 - p) / 20000).sqrt().double()
    assert freq[5] == 0
    assert ((freq[:5] - p[:5]).abs() <= 5 * se[:5] + 1e-12).all(), (freq, p)


def test_top_k_stays_in_top_k():
    x = logits(1).repeat(400, 1)
    k = 3
    allowed = set(x[0].topk(k).indices.tolist())
    out = sample(x, [SamplingParams(temperature=5.0, top_k=k)] * 400, [None] * 400)
    assert set(out) <= allowed and len(set(out)) == k   # high temperature: all k show up


def test_top_p_stays_in_nucleus():
    x = logits(1, seed=7).repeat(400, 1) / 3
    probs = torch.softmax(x[0], -1)
    order = probs.argsort(descending=True)
    mass = probs[order].cumsum(0)
    n_keep = int((mass < 0.6).sum()) + 1            # smallest prefix reaching 0.6
    nucleus = set(order[:n_keep].tolist())
    assert 1 < n_keep < V // 2
    out = sample(x, [SamplingParams(top_p=0.6)] * 400, [None] * 400)
    assert set(out) <= nucleus and len(set(out)) > 1


def test_top_k_and_top_p_per_row():
    x = logits(1, seed=11).repeat(3, 1)
    params = [SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(temperature=0)]
    assert sample(x, params, [None] * 3) == [int(x[0].argmax())] * 3


@pytest.mark.parametrize("shape", [(3, 49152), (2, 128256), (2, 1000), (1, 8192 + 256)])
def test_two_stage_argmax_is_argmax_ties_included(shape):
    """The first index of the maximum, as torch.argmax: a row whose maximum appears in two
    chunks and twice in one, rows of equal values, fp32, fp16 and bf16."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(shape).to(dtype)
        top = x.max() + 1
        x[0, shape[1] - 5] = top
        x[0, shape[1] // 2 + 7] = top
        x[0, shape[1] // 2 + 3] = top
        if shape[0] > 1:
            x[1] = 0.5
        assert torch.equal(sampler.argmax(x), x.argmax(-1))


def test_greedy_rows_of_bf16_logits_pick_the_fp32_argmax():
    """Greedy sampling reads bf16 logits as they are: the same tokens as their fp32 values,
    ties (frequent in bf16) going to the first index; sampled rows in the batch still work."""
    torch.manual_seed(3)
    x = (torch.randn(4, 49152) * 4).to(torch.bfloat16)
    x[2, 100] = x[2, 40000] = x[2].max() + 1
    want = x.float().argmax(-1).tolist()
    assert sample(x, [SamplingParams(temperature=0)] * 4, [None] * 4) == want
    mixed = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=1)] * 2
    got = sample(x, mixed, [None] * 4)
    assert got[0::2] == want[0::2] and all(0 <= t < 49152 for t in got)
