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


# -- speculative decoding in the loop (ngram:K) ---------------------------------------------------
def test_ngram_speculation_in_the_loop_gives_the_greedy_tokens():
    """A repeated prompt drafts from the first step: verify steps over 1 + K tokens, the cache
    rewound past the drafts that did not stand, and the tokens those of eager greedy decoding;
    each step shape (one token, 1 + K) gets its own DirectDecode binding."""
    from kiln.runtime.spec_decode import SpeculativeConfig
    model = models.tiny_llama_gqa()
    # (this prompt's greedy output falls into loops of its own: 14 of its steps draft)
    loop = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    ids = loop.repeat(1, 4)
    want, _ = models.eager_greedy(model, ids, 40)
    torch._dynamo.reset()
    got = greedy(compile_model(model, "kiln"), model, ids, 40,
                 speculative=SpeculativeConfig.parse("ngram:3"))
    assert got.tokens == want[0].tolist()
    assert got.verify_steps > 3 and got.accepted_drafts > 0 and got.mean_accepted_length > 1
    assert "verify: bound" in got.direct, got.direct


def test_loop_speculation_refuses_what_it_cannot_do():
    import pytest

    from kiln.cli import main
    from kiln.runtime.spec_decode import SpeculativeConfig
    ngram = SpeculativeConfig.parse("ngram:3")
    model = build("mistral_sw")   # its sliding-window cache cannot take tokens back
    with pytest.raises(ValueError, match="cannot take back rejected drafts.*--backend kiln"):
        greedy(model, model, torch.tensor([[5, 6, 7]]), 4, speculative=ngram)
    with pytest.raises(ValueError, match="runs one sequence"):
        greedy(model, model, torch.tensor([[5, 6], [7, 8]]), 4, speculative=ngram)
    assert main(["generate", "no-such-model", "--prompt", "hi", "--backend", "eager",
                 "--speculative", "layerskip:2"]) == 2
