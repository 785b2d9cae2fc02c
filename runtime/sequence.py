"""Per-request state: tokens, sampling parameters, progress through the KV cache, timing."""
from __future__ import annotations

import enum
import itertools
import math
import time
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class InvalidParam(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0        # 0 means greedy
    top_p: float = 1.0              # nucleus mass kept, in (0, 1]
    top_k: int = 0                  # 0 (or -1) keeps the whole vocabulary
    seed: int | None = None         # per-request generator: same seed, same output
    stop: list[str] = field(default_factory=list)         # stop strings (not included in text)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise InvalidParam naming the first bad field."""
        def need(ok, name, what):
            if not ok:
                raise InvalidParam(name, f"{name} must be {what}, got {getattr(self, name)!r}")
        need(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "an integer >= 1")
        need(self.temperature >= 0 and math.isfinite(self.temperature), "temperature", "a finite number >= 0")
        need(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        need(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "an integer >= -1 (0 or -1: off)")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings")
        need(self.seed is None or isinstance(self.seed, int) and -2**63 <= self.seed < 2**64, "seed",
             "a 64-bit integer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Status(enum.Enum):
    WAITING = "waiting"      # queued, or preempted and waiting to be recomputed
    RUNNING = "running"      # holds KV blocks, scheduled each step
    FINISHED = "finished"


_ids = itertools.count()

# A token the previous step samples on the device and the host does not know yet (async
# scheduling): it already counts as the sequence's next token and as the next step's input.
PENDING = -1


class Sequence:
    """One request. `token_ids` is prompt then output; `num_computed` of them have KV in the
    cache (through `block_table`). Preemption drops the KV but keeps the tokens."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None):
        self.request_id = request_id if request_id is not None else f"req-{next(_ids)}"
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.max_num_tokens = len(prompt_ids) + params.max_tokens   # it stops by length at this many
        self.params = params
        self.status = Status.WAITING
        self.finish_reason: str | None = None    # "stop", "length" or "abort"
        self.num_computed = 0                    # tokens whose KV is in the cache
        self.num_cached_tokens = 0               # prompt tokens served by the prefix cache
        self.block_table = array("i")           # block ids (int32: copied into batches as is)
        self.block_hashes: list[bytes] = []      # hash of each full, computed block
        self.num_preemptions = 0
        self.generator: torch.Generator | None = None   # made on the logits' device when seeded
        self.final = False       # its last token is pending and will end it (length): not scheduled
        self.draft: list[int] = []   # speculative tokens to verify after its last one (spec_decode)
        self.spec = None             # spec_decode.SpecState, once it has drafted
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self._stamp()

    def append_pending(self) -> int:
        """Count a token sampled on the device but not yet read; returns its index."""
        self.token_ids.append(PENDING)
        return len(self.token_ids) - 1

    def resolve(self, index: int, token_id: int) -> None:
        self.token_ids[index] = token_id
        self._stamp()

    def drop_pending(self) -> None:
        """Forget the tokens still pending (the sequence ends before they are read)."""
        while self.token_ids and self.token_ids[-1] == PENDING:
            self.token_ids.pop()

    def _stamp(self) -> None:
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed}, blocks={self.block_table.tolist()})")
