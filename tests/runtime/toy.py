"""A tiny, deterministic model runner that really uses the paged KV cache, and a tiny tokenizer.

ToyRunner keeps a cache of [num_blocks * block_size, 2] int64 rows: (token id, position).
`execute` writes each new token's row at its slot, then computes each sequence's logits
only from its context read back through `block_tables` / `context_lens`: the next token is
a position-weighted hash of the context (`next_token`, the closed form). Reading a wrong
block, a stale slot, or losing a token changes the answer (and a position mismatch fails
an assertion), so a test that compares against `reference` proves the paging right.
"""
from __future__ import annotations

import threading
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kiln.runtime.batch import FlatBatch

MOD = (1 << 61) - 1


def context_hash(context: list[int]) -> int:
    return sum((t + 1) * (i + 1) * (i + 7) for i, t in enumerate(context)) % MOD


def next_token(context: list[int], allowed: list[int]) -> int:
    """The closed form: what the toy model predicts after `context`."""
    return allowed[(context_hash(context) * 2654435761 + len(context)) % MOD % len(allowed)]


def reference(prompt: list[int], n: int, allowed: list[int]) -> list[int]:
    """Greedy output of the toy model, computed with no cache at all."""
    ctx = list(prompt)
    for _ in range(n):
        ctx.append(next_token(ctx, allowed))
    return ctx[len(prompt):]


class ToyRunner:
    accepts_pending_inputs = True   # (async scheduling: pending inputs are applied on the CPU)

    def __init__(self, vocab_size: int, allowed: list[int] | None = None, num_blocks: int = 64,
                 block_size: int = 4, max_model_len: int = 128):
        self.vocab_size, self.num_blocks, self.block_size = vocab_size, num_blocks, block_size
        self.max_model_len = max_model_len
        self.allowed = allowed if allowed is not None else list(range(vocab_size))
        self.allowed_t = torch.tensor(self.allowed)
        self.cache = torch.full((num_blocks * block_size, 2), -1, dtype=torch.int64)
        self.calls = 0
        self.batches: list[FlatBatch] = []   # kept when record=True
        self.record = False
        self.gate = threading.Event()        # tests close it to hold the engine inside a step
        self.gate.set()
        self.entered = threading.Event()     # set whenever execute starts
        self.delay = 0.0                     # seconds each step takes (to keep requests in flight)
        self.fail: Exception | None = None   # raised by the next steps while set

    def execute(self, batch: FlatBatch) -> torch.Tensor:
        self.entered.set()
        self.gate.wait()
        time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        self.calls += 1
        if batch.pending is not None:
            batch.pending.apply(batch.input_ids)
        if self.record:
            self.batches.append(batch)
        self.cache[batch.slot_mapping, 0] = batch.input_ids
        self.cache[batch.slot_mapping, 1] = batch.positions
        qs, bs = batch.query_start.tolist(), self.block_size
        logits = torch.empty(batch.num_seqs, self.vocab_size)
        for i, length in enumerate(batch.context_lens.tolist()):
            n_new = qs[i + 1] - qs[i]
            assert batch.positions[qs[i]:qs[i + 1]].tolist() == list(range(length - n_new, length))
            blocks = batch.block_tables[i, : -(-length // bs)].long()
            slots = (blocks[:, None] * bs + torch.arange(bs)).flatten()[:length]
            rows = self.cache[slots]
            assert torch.equal(rows[:, 1], torch.arange(length)), f"seq {i} read a wrong slot"
            pos = torch.arange(length, dtype=torch.int64)
            h = int(((rows[:, 0] + 1) * (pos + 1) * (pos + 7)).sum()) % MOD
            nxt = self.allowed[(h * 2654435761 + length) % MOD % len(self.allowed)]
            # argmax at nxt, smooth elsewhere so sampling tests have a real distribution
            dist = (torch.arange(self.vocab_size) - nxt).abs().float()
            logits[i] = -0.5 * dist
        return logits


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog", "hello world, hello kiln",
    "paged attention reads the cache block by block", "the cat sat on the mat",
    "café naïve résumé 日本語 テスト", "one two three four five six seven eight nine ten",
] * 4


def toy_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (~400 tokens) trained in memory, with a ChatML template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   bos_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def word_tokens(tokenizer) -> list[int]:
    """Ids of tokens that decode alone to plain ASCII letters (what the toy model may emit)."""
    out = []
    for i in range(len(tokenizer)):
        s = tokenizer.decode([i])
        if s.strip().isalpha() and s.isascii() and i not in tokenizer.all_special_ids:
            out.append(i)
    return out


def toy_engine(num_blocks: int = 64, block_size: int = 4, max_model_len: int = 128,
               config: dict | None = None, delay: float = 0.0):
    """An engine process's factory (runtime.engine_process): the toy engine, and the tokens
    the toy model may predict (for `reference`)."""
    from kiln.runtime.engine import EngineConfig, LLMEngine
    tok = toy_tokenizer()
    runner = ToyRunner(len(tok), word_tokens(tok), num_blocks=num_blocks, block_size=block_size,
                       max_model_len=max_model_len)
    runner.delay = delay
    return LLMEngine(runner, tok, EngineConfig(**(config or {}))), {"allowed": runner.allowed}


def failing_factory(message: str):
    raise ValueError(message)


def unpicklable_failure():
    class Local(Exception):   # a class pickle cannot find by name
        pass
    raise Local("built inside a function")
