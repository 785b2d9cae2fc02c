"""Per-request state: tokens, sampling parameters, progress through the KV cache, timing."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch


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
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Status(enum.Enum):
    WAITING = "waiting"      # queued, or preempted and waiting to be recomputed
    RUNNING = "running"      # holds KV blocks, scheduled each step
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    """One request. `token_ids` is prompt then output; `num_computed` of them have KV in the
    cache (through `block_table`). Preemption drops the KV but keeps the tokens."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None):
        self.request_id = request_id if request_id is not None else f"req-{next(_ids)}"
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.status = Status.WAITING
        self.finish_reason: str | None = None    # "stop", "length" or "abort"
        self.num_computed = 0                    # tokens whose KV is in the cache
        self.num_cached_tokens = 0               # prompt tokens served by the prefix cache
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []        # hash of each full, computed block
        self.num_preemptions = 0
        self.generator: torch.Generator | None = None   # made on the logits' device when seeded
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
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed}, blocks={self.block_table})")
