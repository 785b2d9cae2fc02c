"""kiln.generate's loop with a kiln-compiled model: after two decode steps through
torch.compile it calls the compiled graph directly (DirectDecode), and the tokens are
those of eager and of the ordinary path; a model whose steps update Python state (a
sliding-window cache's length) stays on the ordinary path and says why."""
from __future__ import annotations


import torch

import models
from models import tiny_llama_dir
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


def test_a_draft_model_in_the_loop_gives_the_greedy_tokens():
    """draft:PATH:K in the loop, with a StaticCache of the draft's own: a 3-layer Llama
    drafted for by its first layer (eager, and both through the kiln backend), and by itself
    (every draft stands)."""
    from transformers import LlamaConfig

    from kiln.runtime.spec_decode import SpeculativeConfig
    config = {**models.COMMON, "num_key_value_heads": 2}
    target = models._build(LlamaConfig(**{**config, "num_hidden_layers": 3}), "sdpa")
    small = models._build(LlamaConfig(**{**config, "num_hidden_layers": 1}), "sdpa")
    small.load_state_dict({k: v for k, v in target.state_dict().items()
                           if not k.startswith("model.layers.") or k.startswith("model.layers.0.")})
    ids = torch.randint(3, target.config.vocab_size, (1, 9))
    want = models.eager_greedy(target, ids, 20)[0][0].tolist()
    spec = SpeculativeConfig.parse("draft:first-layer:3")
    itself = greedy(target, target, ids, 20, speculative=spec, draft=(target, target))
    assert itself.tokens == want and itself.accepted_drafts == itself.draft_tokens > 0
    assert greedy(target, target, ids, 20, speculative=spec, draft=(small, small)).tokens == want
    torch._dynamo.reset()
    got = greedy(compile_model(target, "kiln"), target, ids, 20, speculative=spec,
                 draft=(compile_model(small, "kiln"), small))
    assert got.tokens == want and got.verify_steps > 3 and "draft: bound" in got.direct, got.direct


def test_generate_static_with_a_draft_model(tmp_path, capsys):
    from kiln.cli import main
    d = tiny_llama_dir(tmp_path / "tiny")
    spec = f"draft:{d}:3"
    assert main(["generate", str(d), "--backend", "eager", "--prompt", "one two", "--no-chat",
                 "--max-tokens", "12", "--speculative", spec]) == 0
    # The model drafting for itself: every draft stands. 11 tokens after the first: 3 verify
    # steps of 3, 3 and 2 drafts (the room left), 8 standing.
    assert "12 tokens | " in (err := capsys.readouterr().err)
    assert f"{spec}: mean accepted length {1 + 8 / 3:.2f}" in err, err[-500:]
