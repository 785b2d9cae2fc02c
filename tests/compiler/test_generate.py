"""kiln.generate's loop with a kiln-compiled model: after two decode steps through
torch.compile it calls the compiled graph directly (DirectDecode), and the tokens are
those of eager and of the ordinary path; a model whose steps update Python state (a
sliding-window cache's length) stays on the ordinary path and says why."""
from __future__ import annotations

import torch

import models
from families import VOCAB, build
from kiln.generate import compile_model, greedy, make_cache

STEPS = 12


def run(model, backend, direct=True):
    torch._dynamo.reset()
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    return greedy(compile_model(model, backend), model, ids, STEPS,
                  cache=make_cache(model, 7 + STEPS), direct=direct)


def test_direct_decode_binds_and_gives_eager_tokens():
    model = models.tiny_llama_gqa()
    eager = run(model, "eager")
    assert eager.direct.startswith("a step made 0 kiln graph calls")   # nothing to bind to
    slow = run(model, "kiln", direct=False)
    fast = run(model, "kiln")
    assert fast.direct == "bound"
    # the first two decode steps (the first also compiles) are watched, the rest run directly
    assert fast.direct_steps == STEPS - 1 - 2
    assert fast.tokens == slow.tokens == eager.tokens


def test_python_state_keeps_the_ordinary_path():
    model = build("mistral_sw")
    eager = run(model, "eager")
    got = run(model, "kiln")
    assert got.direct_steps == 0 and "values (Python state it updates" in got.direct
    assert got.tokens == eager.tokens
