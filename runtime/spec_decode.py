"""Speculative decoding: propose draft tokens, verify them all in one model step, accept.

A sequence that decodes gets up to k draft tokens from a drafter (`NgramProposer`: prompt
lookup, no weights). The step then runs its last token and its drafts together, and the
logits of all 1 + k positions decide how many drafts stand:
- greedy rows keep the longest prefix of drafts that equals the argmax at each position,
  plus the argmax after it (the bonus token): the tokens are exactly those of plain greedy
  decoding, one model step for up to k + 1 of them;
- sampled rows use rejection sampling (Leviathan et al. 2023, Chen et al. 2023). Every
  drafter here drafts deterministically, so its proposal distribution is a point mass q on
  the draft d: accept d with probability min(1, p(d) / q(d)) = p(d); at the first rejection
  draw from the residual max(0, p - q) normalised, which is p with d removed; when all k
  stand, draw the bonus token from p at the last position. Each emitted token then has
  the target distribution p (temperature, top-k and top-p applied) given the tokens before
  it, exactly as without speculation (tests/runtime/test_spec_decode.py checks it
  statistically).

The verify step is laid out as a decode batch: the sequence's last token and each draft
token are rows of their own, all reading the sequence's block table, row j at position
p + j with context p + j + 1. Paged attention writes every row's K/V before any row
attends (kiln_ref.paged_attention), so row j sees the drafts before it and nothing after:
the causal attention of one 1 + k token chunk, with the logits of every position, through
the same serving graph (and, on a GPU, the same decode-bucket CUDA graphs) as plain
decoding. KV written for rejected drafts stays in slots past the sequence's length, which
nothing reads and the next tokens overwrite; blocks that only held them are freed.

Turning it off (`SpecState`): drafting costs a wider step whether or not the drafts stand.
A sequence whose last `AUTO_OFF_WINDOW` verify steps accepted fewer than
`AUTO_OFF_MIN_ACCEPTED` draft tokens a step on average stops drafting for the next
`AUTO_OFF_COOLDOWN` tokens, then tries again. The n-gram drafter proposes nothing when the
recent tokens have no earlier match; such a step runs as a plain decode, but with async
scheduling it still costs a drafting step's price (below), so there a window of them turns
the sequence off too, for `NO_DRAFT_COOLDOWN` tokens.

A step whose drafting sequences would verify more than `MAX_VERIFY_ROWS` rows in all
(sequences x (1 + k)) drafts nothing: a large batch already reads the weights once for many
tokens, so verify rows add compute without saving weight reads. On the H200 (SmolLM2,
bf16), 64 streams ran at 0.37x of plain decoding with every sequence drafting.

What a drafting step costs beyond its rows: the drafter needs the tokens of the step before,
so it cannot be planned while that step runs. An engine with async scheduling (on a GPU)
runs every step in which nothing may draft (`may_draft`: all sequences off, or too many
rows) asynchronously, as without speculation, and finishes the step in flight before one
that drafts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .sampler import argmax, draw, processed_logits
from .sequence import PENDING, SamplingParams, Sequence

MAX_K = 16                    # draft tokens per step, at most
AUTO_OFF_WINDOW = 8           # verify steps a sequence's acceptance is judged over
AUTO_OFF_MIN_ACCEPTED = 0.5   # accepted draft tokens per verify step, at least, to keep drafting
AUTO_OFF_COOLDOWN = 32        # generated tokens a sequence decodes plainly before drafting again
NO_DRAFT_COOLDOWN = 8         # the same after a window of steps in which the drafter had nothing
MAX_VERIFY_ROWS = 32          # rows a step's drafting sequences may verify; past it none drafts

# The methods `--speculative` knows, with their spelling (for messages).
METHODS = {"ngram": "ngram:K (prompt lookup: no extra weights)",
           "layerskip": "layerskip:K[:layers=A-B] (the model minus decoder layers A..B; "
                        "default: the middle half)",
           "draft": "draft:PATH:K (a smaller model of the same tokenizer drafts: PATH is "
                    "what kiln generate takes as MODEL, or an artifact directory)",
           "mtp": "mtp:K (the model's own multi-token-prediction module, chained for K > 1: "
                  "DeepSeek-V3 and GLM-4.5 style checkpoints)"}
SPELLINGS = ", ".join(METHODS.values())


class SpeculativeError(ValueError):
    """A wrong `--speculative` value or one the model cannot use; the message says the fix."""


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str                    # a key of METHODS
    k: int                         # draft tokens per step, 1..MAX_K
    ngram_max: int = 4             # ngram: the longest suffix looked up
    ngram_min: int = 2             # ngram: the shortest
    layers: tuple[int, int] | None = None   # layerskip: the decoder layers skipped, A..B inclusive
    draft_model: str | None = None # draft: the draft model's PATH (a model spec or an artifact)

    @classmethod
    def parse(cls, text: str) -> "SpeculativeConfig":
        """`METHOD:K`, e.g. `ngram:4`."""
        method, _, rest = str(text).strip().partition(":")
        if method not in METHODS:
            raise SpeculativeError(f"--speculative {text!r}: unknown method {method!r}; use one "
                                   f"of: {SPELLINGS}")
        if not rest:
            raise SpeculativeError(f"--speculative {text!r}: the number of draft tokens is "
                                   f"missing; write {METHODS[method]}, e.g. {method}:4")
        if method == "draft":
            return cls._parse_draft(text, rest)
        k_text, _, extra = rest.partition(":")
        layers = None
        if extra and method != "layerskip":
            raise SpeculativeError(f"--speculative {text!r}: {method} takes no options after "
                                   f"K; write {METHODS[method]}")
        if extra:
            a, dash, b = extra.removeprefix("layers=").partition("-")
            if not extra.startswith("layers=") or not dash or not (a.isdigit() and b.isdigit()) \
                    or int(a) > int(b):
                raise SpeculativeError(f"--speculative {text!r}: the layers skipped are written "
                                       f"layers=A-B (0-based, A <= B), e.g. layerskip:3:layers=8-15")
            layers = (int(a), int(b))
        return cls(method, _tokens_per_step(text, method, k_text), layers=layers)

    @classmethod
    def _parse_draft(cls, text: str, rest: str) -> "SpeculativeConfig":
        """`draft:PATH:K`: K is after the last ':', so PATH may hold colons of its own."""
        path, colon, k_text = rest.rpartition(":")
        if not colon or not path:
            raise SpeculativeError(f"--speculative {text!r}: write {METHODS['draft']}, the draft "
                                   f"model and then the number of draft tokens, e.g. "
                                   f"draft:smollm2:4")
        return cls("draft", _tokens_per_step(text, "draft", k_text), draft_model=path)

    def __str__(self) -> str:
        if self.method == "draft":
            return f"draft:{self.draft_model}:{self.k}"
        layers = f":layers={self.layers[0]}-{self.layers[1]}" if self.layers else ""
        return f"{self.method}:{self.k}{layers}"

    def skipped_layers(self, num_layers: int) -> list[int]:
        """layerskip: the decoder layers the draft leaves out."""
        from kiln.passes.spec import default_skipped_layers
        if self.layers is None:
            return default_skipped_layers(num_layers)
        return list(range(self.layers[0], self.layers[1] + 1))


def _tokens_per_step(text: str, method: str, k_text: str) -> int:
    """K of a `--speculative` value: a whole number in [1, MAX_K]."""
    try:
        k = int(k_text)
    except ValueError:
        k = None
    if k is None or not 1 <= k <= MAX_K:
        example = "draft:smollm2:4" if method == "draft" else f"{method}:4"
        raise SpeculativeError(f"--speculative {text!r}: K must be a whole number of draft "
                               f"tokens a step in [1, {MAX_K}], got {k_text!r}; write "
                               f"{METHODS[method]}, e.g. {example}")
    return k


class NgramProposer:
    """Prompt lookup: the k tokens that followed the most recent earlier occurrence of the
    sequence's last n tokens (prompt and output so far), trying n = ngram_max down to
    ngram_min; none when no suffix recurs."""
    async_between_drafts = True   # it reads the tokens as they are: nothing to catch up on

    def __init__(self, max_n: int = 4, min_n: int = 2):
        assert 1 <= min_n <= max_n
        self.max_n, self.min_n = max_n, min_n

    def propose(self, tokens: list[int], k: int) -> list[int]:
        arr = np.asarray(tokens, dtype=np.int64)
        size = len(arr)
        for n in range(min(self.max_n, size - 1), self.min_n - 1, -1):
            # windows starting at 0 .. size - n - 1: every n-gram but the suffix itself
            windows = np.lib.stride_tricks.sliding_window_view(arr[:size - 1], n)
            hits = np.flatnonzero((windows == arr[size - n:]).all(1))
            if hits.size:
                start = int(hits[-1]) + n
                return arr[start:start + k].tolist()
        return []

    def propose_batch(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        return [self.propose(s.token_ids, k) for s, k in zip(seqs, ks)]


class LayerSkipProposer:
    """Self-speculation: the draft runner (the model minus some decoder layers, passes/spec.py,
    its KV caches those of the full model's kept layers) decodes k tokens greedily, one
    decode batch of all drafting sequences per token. Its KV writes land at the positions
    the verify step then rewrites; the blocks for them are allocated here (a sequence the
    pool has no room for drafts nothing)."""
    async_between_drafts = True   # its KV is the model's own, written by every step

    def __init__(self, runner, blocks):
        self.runner, self.blocks = runner, blocks

    def propose_batch(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        from .batch import build_batch
        drafts: list[list[int]] = [[] for _ in seqs]
        live = [i for i, (s, k) in enumerate(zip(seqs, ks)) if self.blocks.allocate(s, 1 + k)]
        for j in range(max((ks[i] for i in live), default=0)):
            live = [i for i in live if len(drafts[i]) < ks[i]]
            items = [(seqs[i].token_ids + drafts[i], seqs[i].num_computed + j, 1, seqs[i].block_table)
                     for i in live]
            tokens = argmax(self.runner.execute(build_batch(items, self.blocks.block_size))).tolist()
            for i, t in zip(live, tokens):
                drafts[i].append(t)
        return drafts


class UnreadTokens:
    """The token ids of a draft decode step whose inputs are the previous draft step's
    outputs, still on the device: for build_batch, every index is PENDING, and the batch's
    pending inputs (batch.PendingInputs) put the real ids in before the model reads them."""

    def __getitem__(self, index: int) -> int:
        return PENDING


def gather_drafts(steps: list[tuple[list[int], torch.Tensor]], num_seqs: int) -> list[list[int]]:
    """Each sequence's drafts from per-step outputs (the sequence indices that drafted in the
    step, their tokens on the device), read in one copy: the one wait for the device."""
    drafts: list[list[int]] = [[] for _ in range(num_seqs)]
    tokens = torch.cat([t for _, t in steps]).tolist()
    at = 0
    for which, _ in steps:
        for i, token in zip(which, tokens[at:at + len(which)]):
            drafts[i].append(token)
        at += len(which)
    return drafts


@dataclass
class SpecState:
    """Per sequence: its recent acceptance (auto-off) and how long it is off."""
    recent: list[int] = field(default_factory=list)   # accepted drafts of its last verify steps
    off_until: int = 0                                # drafting resumes at this many tokens

    def record(self, accepted: int | None, num_tokens: int) -> None:
        """`accepted`: the drafts that stood in a verify step; None: the drafter had none."""
        self.recent.append(accepted)
        if len(self.recent) < AUTO_OFF_WINDOW:
            return
        del self.recent[:-AUTO_OFF_WINDOW]
        if sum(a or 0 for a in self.recent) < AUTO_OFF_MIN_ACCEPTED * AUTO_OFF_WINDOW:
            # Drafts that were rejected: off for long. Only no drafts at all: text may start
            # to recur any moment, so ask again soon.
            drafted = any(a is not None for a in self.recent)
            self.off_until = num_tokens + (AUTO_OFF_COOLDOWN if drafted else NO_DRAFT_COOLDOWN)
            self.recent.clear()


@dataclass
class SpecStats:
    verify_steps: int = 0      # sequence-steps that verified a draft
    draft_tokens: int = 0      # draft tokens verified
    accepted_tokens: int = 0   # of those, accepted
    auto_off: int = 0          # times a sequence stopped drafting for low acceptance
    large_batch_steps: int = 0  # steps that drafted nothing: too many rows to verify

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verify step produced per sequence: accepted drafts plus the bonus token."""
        return 1 + self.accepted_tokens / self.verify_steps if self.verify_steps else 0.0


class SpecDecoder:
    """Drafts for the engine's decoding sequences and accepts what their verify step says."""

    def __init__(self, config: SpeculativeConfig, proposer=None):
        self.config = config
        if proposer is None and config.method != "ngram":
            raise SpeculativeError(f"--speculative {config}: {config.method} drafts with a "
                                   f"compiled draft graph; build the engine with kiln.serving "
                                   f"(kiln generate / kiln serve MODEL), which compiles it")
        self.proposer = proposer or NgramProposer(config.ngram_max, config.ngram_min)
        self.stats = SpecStats()
        self.pause_without_drafts = False

    def _candidates(self, seqs: list[Sequence]) -> tuple[list[Sequence], list[int]] | None:
        """The sequences that may draft this step and the draft tokens each has room for;
        None as soon as they would verify more than MAX_VERIFY_ROWS rows (then none drafts:
        a large batch stops looking there, which keeps `may_draft` cheap on every step)."""
        k = self.config.k
        drafting, rooms, rows = [], [], 0
        for seq in seqs:
            if seq.final or seq.num_pending != 1:
                continue
            state = seq.spec
            if state is None:
                state = seq.spec = SpecState()
            if seq.num_tokens < state.off_until:
                continue
            # The step emits up to 1 + k tokens; the sequence may end after fewer.
            room = min(k, seq.max_num_tokens - seq.num_tokens - 1)
            if room > 0:
                rows += 1 + room
                if rows > MAX_VERIFY_ROWS:
                    return None
                drafting.append(seq)
                rooms.append(room)
        return drafting, rooms

    def may_draft(self, seqs: list[Sequence]) -> bool:
        """Whether `propose` would ask the drafter for any of `seqs` now: some sequence is on
        and the rows all of them would verify fit MAX_VERIFY_ROWS. An engine with async
        scheduling runs the other steps asynchronously (drafting needs the last tokens) and
        sets `pause_without_drafts`."""
        found = self._candidates(seqs)
        return found is not None and bool(found[0])

    def propose(self, seqs: list[Sequence]) -> None:
        """Set `seq.draft` of each sequence about to decode one token (the scheduler runs it
        and may shorten it); the others get none. With `pause_without_drafts` (an engine that
        runs ahead when nothing drafts), a step in which the drafter has nothing for a sequence
        (no n-gram recurs) counts towards its auto-off: asking cost the step its overlap."""
        for seq in seqs:
            seq.draft = []
        found = self._candidates(seqs)
        if found is None:
            self.stats.large_batch_steps += 1
            return
        drafting, rooms = found
        if drafting:
            for seq, draft in zip(drafting, self.proposer.propose_batch(drafting, rooms)):
                seq.draft = draft
                if not draft and self.pause_without_drafts:
                    self._judge(seq, None, seq.num_tokens)

    def accept(self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]]
               ) -> list[list[int]]:
        """logits: [sum(1 + len(d) for d in drafts), V], each sequence's rows in order (its
        last token's, then one per draft token). Returns each sequence's new tokens: its
        accepted drafts and one more (the bonus, or the correction at the first rejection)."""
        starts = np.zeros(len(seqs) + 1, np.int64)
        np.cumsum([1 + len(d) for d in drafts], out=starts[1:])
        greedy_rows = [i for i, s in enumerate(seqs) if s.params.greedy]
        out: list[list[int]] = [[] for _ in seqs]
        if greedy_rows:
            picks = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in greedy_rows])
            rows = logits if len(picks) == logits.shape[0] else logits[torch.from_numpy(picks).to(logits.device)]
            target = argmax(rows).tolist()
            at = 0
            for i in greedy_rows:
                draft, m = drafts[i], 1 + len(drafts[i])
                best = target[at:at + m]
                at += m
                a = 0
                while a < len(draft) and draft[a] == best[a]:
                    a += 1
                out[i] = best[:a + 1]
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled:
            for i, tokens in zip(sampled, self._rejection_sample(logits, starts, seqs, drafts, sampled)):
                out[i] = tokens
        for seq, draft, tokens in zip(seqs, drafts, out):
            if draft:
                self._record(seq, len(draft), len(tokens) - 1)
        return out

    def _rejection_sample(self, logits, starts, seqs, drafts, which: list[int]) -> list[list[int]]:
        dev = logits.device
        picks = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in which])
        params = [seqs[i].params for i in which for _ in range(1 + len(drafts[i]))]
        x, _ = processed_logits(logits[torch.from_numpy(picks).to(dev)], params)
        probs = torch.softmax(x, -1, dtype=torch.float64)
        local = np.zeros(len(which) + 1, np.int64)   # each sequence's first row in `probs`
        np.cumsum([1 + len(drafts[i]) for i in which], out=local[1:])
        # Per sequence k + 1 uniforms: one per draft token (does it stand?), then one for
        # the token drawn after them; a seeded sequence's from its own generator, in order.
        u = []
        for i in which:
            g, m = seqs[i].generator, 1 + len(drafts[i])
            u.append(torch.rand(m, generator=g, device=g.device, dtype=torch.float64).to(dev)
                     if g is not None else torch.rand(m, device=dev, dtype=torch.float64))
        accepted = []
        if any(drafts[i] for i in which):
            rows = torch.tensor([int(local[j]) + t for j, i in enumerate(which)
                                 for t in range(len(drafts[i]))], device=dev)
            ids = torch.tensor([d for i in which for d in drafts[i]], device=dev)
            u_drafts = torch.cat([x[:-1] for x in u])
            accepted = (u_drafts < probs[rows, ids]).tolist()
        final_rows, excluded, counts = [], [], []
        at = 0
        for j, i in enumerate(which):
            k = len(drafts[i])
            a = 0
            while a < k and accepted[at + a]:
                a += 1
            at += k
            counts.append(a)
            final_rows.append(int(local[j]) + a)
            excluded.append(drafts[i][a] if a < k else -1)
        final = probs[torch.tensor(final_rows, device=dev)]
        ex = torch.tensor(excluded, device=dev)
        rejected = ex >= 0
        if bool(rejected.any()):   # the residual max(0, p - q) of a point mass q: p without d
            final[rejected, ex[rejected]] = 0.0
        u_final = torch.stack([x[-1] for x in u])[:, None]
        tokens = draw(final, u_final, final.argmax(-1)).tolist()
        return [drafts[i][:a] + [t] for i, a, t in zip(which, counts, tokens)]

    def _record(self, seq: Sequence, drafted: int, accepted: int) -> None:
        s = self.stats
        s.verify_steps += 1
        s.draft_tokens += drafted
        s.accepted_tokens += accepted
        self._judge(seq, accepted, seq.num_tokens + accepted + 1)

    def _judge(self, seq: Sequence, accepted: int | None, num_tokens: int) -> None:
        """Record a drafting step in the sequence's auto-off window (SpecState.record)."""
        state = seq.spec
        before = state.off_until
        state.record(accepted, num_tokens)
        self.stats.auto_off += state.off_until != before

    def release(self, seq: Sequence) -> None:
        """The sequence is done (finished or aborted): a drafter that keeps state of its own
        per sequence (the draft model's KV blocks, spec_draft.py) lets it go."""
        release = getattr(self.proposer, "release", None)
        if release is not None:
            release(seq)
