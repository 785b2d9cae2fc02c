"""What the server drives, wherever the engine runs, and what crosses between them:
`EngineClient` hands each request's outputs to an asyncio consumer through a
`RequestStream`; requests and aborts reach the engine as commands. `engine.AsyncEngine`
runs the engine in a thread of this process, `engine_process.EngineProcess` in a process
of its own. Nothing here imports torch: the HTTP side of `kiln serve` starts without it
while the engine's process imports it (issue #16).
"""
from __future__ import annotations

import asyncio
import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from .sequence import InvalidParam, SamplingParams


class RequestError(ValueError):
    """The request itself is wrong (bad parameter, prompt too long); `param` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code

    def __reduce__(self):   # crosses to the server from an engine process
        return type(self), (str(self), self.param, self.code)


class QueueFullError(RuntimeError):
    """Back-pressure: the waiting queue is at `max_waiting`; retry later."""


class EngineStepError(RuntimeError):
    """The model runner failed during a step (or the engine shut down); the requests in
    flight were aborted."""


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int      # prompt tokens served by the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestOutput:
    request_id: str
    text: str                          # new text since the previous output
    token_ids: list[int] = field(default_factory=list)   # new tokens
    finished: bool = False
    finish_reason: str | None = None   # "stop", "length", "abort"
    usage: Usage | None = None         # on the last output of a request


def check_request(prompt_ids: list[int], params: SamplingParams, vocab_size: int,
                  max_model_len: int) -> None:
    """Raise RequestError if the request can never run (cheap, no engine state)."""
    try:
        params.validate()
    except InvalidParam as e:
        raise RequestError(str(e), e.param) from None
    if not prompt_ids:
        raise RequestError("the prompt is empty", "prompt")
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in prompt_ids):
        raise RequestError(f"prompt token ids must be integers in [0, {vocab_size})", "prompt")
    total = len(prompt_ids) + params.max_tokens
    if total > max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {total} tokens ({len(prompt_ids)} in the prompt, {params.max_tokens} for "
            f"the completion). Please reduce the prompt or max_tokens.",
            "max_tokens", "context_length_exceeded")


class RequestStream:
    """The outputs of one request, for an asyncio consumer: `async for out in stream`.

    A consumer that fell behind (several outputs queued) gets them merged into one: under
    load a stream then costs the event loop one event per wake-up, not one per token."""

    def __init__(self, engine: "EngineClient", request_id: str, loop: asyncio.AbstractEventLoop):
        self.engine, self.request_id, self.loop = engine, request_id, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self._error: BaseException | None = None   # raised after the outputs queued before it

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item, self._error = self._error or await self.queue.get(), None
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        while not item.finished and not self.queue.empty():
            more = self.queue.get_nowait()
            if isinstance(more, BaseException):
                self._error = more
                break
            merge_outputs(item, more)
        self.finished = item.finished
        return item

    def abort(self) -> None:
        """Stop generating (client gone); frees the request's blocks. Safe to call twice."""
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)

    async def collect(self) -> RequestOutput:
        """Wait for the end; the whole text, tokens and final usage in one output."""
        total = RequestOutput(self.request_id, "")
        async for out in self:
            merge_outputs(total, out)
        return total


def merge_outputs(a: RequestOutput, b: RequestOutput) -> None:
    """Extend `a` in place with `b`, the next output of the same request."""
    a.text += b.text
    a.token_ids += b.token_ids
    a.finished, a.finish_reason, a.usage = b.finished, b.finish_reason, b.usage


class EngineClient(ABC):
    """What the server drives, wherever the engine runs: `add_request` gives a RequestStream,
    `abort` stops one. Requests and aborts go to the engine as commands (`_send`); the
    engine's outputs come back in batches, one per step, to `_deliver`. Subclasses: the
    engine in a thread of this process (AsyncEngine) or in a process of its own
    (engine_process.EngineProcess)."""

    _ids = itertools.count()

    def __init__(self, tokenizer, max_model_len: int, vocab_size: int, max_waiting: int):
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self.vocab_size, self.max_waiting = vocab_size, max_waiting
        self._streams: dict[str, RequestStream] = {}

    # -- what subclasses provide ----------------------------------------------------------------
    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def shutdown(self, timeout: float = 5.0) -> None: ...

    @abstractmethod
    def num_waiting(self) -> int:
        """Requests sent and not yet running (back-pressure)."""

    @abstractmethod
    def _send(self, command: tuple) -> None: ...

    @abstractmethod
    async def metrics_text(self) -> bytes:
        """The engine's Prometheus metrics, rendered."""

    @property
    def failure(self) -> str | None:
        """Why the engine can take no more requests (it is gone), or None."""
        return None

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> RequestStream:
        """Call from the event loop. Raises RequestError (bad request), QueueFullError, or
        EngineStepError when the engine is gone."""
        check_request(prompt_ids, params, self.vocab_size, self.max_model_len)
        if self.failure is not None:
            raise EngineStepError(self.failure)
        if self.num_waiting() >= self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests); retry later")
        rid = request_id or f"req-{next(self._ids)}"
        stream = RequestStream(self, rid, asyncio.get_running_loop())
        self._streams[rid] = stream
        self._send(("add", (list(prompt_ids), params, rid)))
        self.start()
        return stream

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        """Hand (request id, output or error) pairs to their streams: one wake-up per event
        loop for the lot, not one per output."""
        by_loop: dict = {}
        for rid, item in items:
            stream = self._streams.get(rid)
            if stream is None:
                continue
            if isinstance(item, BaseException) or item.finished:
                del self._streams[rid]
            by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:   # the consumers' event loop is gone
                for stream, _ in batch:
                    self.abort(stream.request_id)

    def _fail_all(self, error: BaseException) -> None:
        self._deliver([(rid, error) for rid in list(self._streams)])


def _put_all(batch: list[tuple[RequestStream, object]]) -> None:
    for stream, item in batch:
        stream.queue.put_nowait(item)
