"""Next-token sampling, per request parameters, vectorised over the batch.

Greedy rows take the argmax. Other rows: scale by temperature, keep the top-k tokens, then
the smallest set of those whose probability mass reaches top-p (always at least one), and
draw from what is left by inverting the row's CDF at one uniform number (a float64 cumsum,
so a 128k vocabulary loses no tail mass to rounding). One number per row, not one per
token: drawing a vocabulary's worth of exponentials (the exponential-race trick) or
torch.multinomial took ~75 ms for 64 x 49152 on a 2-core CPU, the inverse CDF ~2 ms, and
it needs no host synchronisation on a GPU either. Rows with a seed draw their number from
their own generator, so a seeded request gives the same tokens whatever else is in the
batch.
"""
from __future__ import annotations

import torch

from .batch import to_device
from .sequence import SamplingParams


# Tokens per chunk of the two-stage argmax.
ARGMAX_CHUNK = 256


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, V] -> [N], each row's first index of its maximum, like `argmax(-1)`.

    torch reduces a long row in one thread block: an LM head's 128k logits took 28.8 us on
    an H200 (bench/decode.py's kernel table), 3% of a Llama-3.2-1B decode step. In two
    stages, each chunk's maximum and then the first chunk holding the largest, every
    stage is a wide reduction: the first maximum of the first such chunk is the row's."""
    n, v = logits.shape
    if v < 32 * ARGMAX_CHUNK or v % ARGMAX_CHUNK:
        return logits.argmax(-1)
    best, where = logits.reshape(n, v // ARGMAX_CHUNK, ARGMAX_CHUNK).max(-1)
    chunk = best.argmax(-1, keepdim=True)
    return (where.gather(-1, chunk) + chunk * ARGMAX_CHUNK)[:, 0]


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """logits [N, V] -> N token ids."""
    return sample_on_device(logits, params, generators).tolist()


def sample_on_device(logits: torch.Tensor, params: list[SamplingParams],
                     generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits [N, V] -> [N] int64 token ids on the logits' device. Nothing here waits for
    the device: the per-row parameters travel in one copy, and whether any row truncates is
    decided from the parameters on the host."""
    # The argmax of bf16/fp16 logits is that of their exact fp32 values: it reads the model's
    # dtype, not a converted copy (half the bytes, and no conversion pass).
    greedy = argmax(logits)
    if all(p.greedy for p in params):
        return greedy
    x, is_greedy = processed_logits(logits, params)
    u = uniforms(params, generators, logits.device)
    sampled = draw(torch.softmax(x, -1), u, greedy)
    return torch.where(is_greedy, greedy, sampled)


def processed_logits(logits: torch.Tensor, params: list[SamplingParams]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 logits each row samples from (temperature applied, -inf outside its
    top-k and top-p; greedy rows at temperature 1, untruncated) and the rows' greedy mask:
    softmax of the first is the distribution a sampled row draws from."""
    logits = logits.float()
    vocab = logits.shape[1]
    rows = to_device([(p.temperature if not p.greedy else 1.0,
                       p.top_k if 0 < p.top_k < vocab else vocab, p.top_p, p.greedy)
                      for p in params], logits.device, torch.float64)
    temps, top_k, top_p, is_greedy = rows.unbind(1)
    x = logits / temps[:, None].float()
    if any(0 < p.top_k < vocab or p.top_p < 1 for p in params if not p.greedy):
        x = _truncate(x, top_k.long(), top_p.float())
    return x, is_greedy.bool()


def uniforms(params: list[SamplingParams], generators: list[torch.Generator | None],
             device: torch.device) -> torch.Tensor:
    """[N, 1] float64 uniforms in [0, 1), one a row; a seeded row's from its own generator."""
    u = torch.rand(len(params), 1, device=device, dtype=torch.float64)
    for i, g in enumerate(generators):
        if g is not None and not params[i].greedy:
            u[i] = torch.rand(1, generator=g, device=g.device, dtype=torch.float64).to(device)
    return u


def draw(probs: torch.Tensor, u: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """probs [N, V] (each row's weights, not necessarily summing to 1), u [N, 1] -> [N]: the
    token whose CDF interval holds u, by inverting each row's CDF; `fallback` [N] where
    rounding runs past the end."""
    cdf = probs.double().cumsum(-1)   # (cumsum(dtype=float64) is 10x slower on a CPU)
    # First token whose CDF passes u: a token of zero probability never does. u * total
    # rounding up to the total (u within 1e-16 of 1) would run past the end: fallback then.
    sampled = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]
    return torch.where(sampled < probs.shape[1], sampled, fallback)


def _truncate(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-k, then outside its top-p nucleus."""
    sorted_x, order = x.sort(-1, descending=True)
    rank = torch.arange(x.shape[-1], device=x.device)
    drop = rank[None, :] >= top_k[:, None]
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_x, -1)
    mass_before = probs.cumsum(-1) - probs           # mass of the strictly better tokens
    drop |= mass_before >= top_p[:, None]            # rank 0 has mass 0 < top_p: always kept
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
