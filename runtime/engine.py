"""The engine: requests in, one model step at a time, text deltas out.

`LLMEngine` is synchronous and single-threaded: `add_request`, `abort`, `step`.
An `EngineClient` (client.py) is what the server drives: it hands each request's outputs
to an asyncio consumer through a `RequestStream`, and requests and aborts reach the engine
as commands, so the engine's state is only ever touched by the one loop (`serve_commands`)
that runs it. `AsyncEngine` runs that loop in a thread of this process;
`engine_process.EngineProcess` in a process of its own, so that the engine and the HTTP
server do not share one interpreter lock.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .batch import ModelRunner, PendingInputs, to_device
from .client import (EngineClient, EngineStepError, QueueFullError, RequestError, RequestOutput,
                     Usage, check_request, merge_outputs)
from .detokenizer import Detokenizer
from .kv_cache import BlockManager
from .metrics import DeviceTimer, EngineMetrics
from .sampler import make_generator, sample_on_device
from .scheduler import ScheduledStep, Scheduler, SchedulerConfig
from .spec_decode import SpecDecoder, SpeculativeConfig
from .sequence import PENDING, SamplingParams, Sequence, Status

log = logging.getLogger("kiln.runtime")


@dataclass
class EngineConfig:
    max_num_seqs: int = 256              # sequences running at once
    max_num_batched_tokens: int = 512    # new tokens per step
    max_waiting: int = 256               # queued requests before add_request refuses
    enable_prefix_caching: bool = True
    eos_token_ids: list[int] | None = None   # default: the tokenizer's eos_token_id
    # Plan and launch step N+1 before reading step N's tokens, so the host work of a step
    # (scheduling, batch assembly, outputs, detokenization) overlaps the device's. None:
    # on for a CUDA runner that accepts pending inputs (batch.PendingInputs).
    async_scheduling: bool | None = None
    # Draft tokens and verify them in one step (runtime.spec_decode); None: off. A step
    # that drafts needs the previous one's tokens: only the others run ahead.
    speculative: SpeculativeConfig | None = None
    # A verify step's rows computed as one-row batches (backends/batch_invariance.py), so on a
    # GPU in bf16 greedy tokens are exactly plain decoding's; costs weight re-reads from L2.
    invariant_verify: bool = True


@dataclass
class _InFlight:
    """A launched step whose sampled tokens the host has not read yet."""
    step: ScheduledStep
    seqs: list[Sequence]                  # the sampled sequences, in the order of `tokens`
    indices: list[int]                    # the index of each one's pending token
    row_of: dict[Sequence, int]           # the row of `tokens` each sampled sequence gets
    chunks: list[Sequence]                # those that ran a prefill chunk and sample nothing
    tokens: object                        # [len(seqs)] int64 on the device, or None
    timer: DeviceTimer
    host_tokens: object = None            # their copy in pinned host memory (CUDA)
    copied: object = None                 # a CUDA event after that copy

    def read_tokens(self) -> list[int]:
        """The sampled ids, waiting for this step's copy only. (`tolist()` on the device
        tensor would synchronize the whole stream: the next step, launched since, too.)"""
        if self.tokens is None:
            return []
        if self.copied is None:
            return self.tokens.tolist()
        self.copied.synchronize()
        return self.host_tokens.tolist()


class LLMEngine:
    """`step()` runs one model step and returns the outputs it produced. With async
    scheduling a call plans and launches the next step, then reads the previous one's
    tokens (the device is busy with the new step meanwhile) and returns that step's outputs:
    each output comes one call later, and a sequence that stops (EOS, a stop string) has
    run one more token on the device, which is dropped."""

    def __init__(self, runner: ModelRunner, tokenizer, config: EngineConfig | None = None,
                 draft_runner: ModelRunner | None = None):
        self.runner, self.tokenizer = runner, tokenizer
        self.config = config = config or EngineConfig()
        self.max_model_len = runner.max_model_len
        if runner.max_model_len > runner.num_blocks * runner.block_size:
            raise ValueError(f"max_model_len {runner.max_model_len} does not fit in the KV cache "
                             f"({runner.num_blocks} blocks x {runner.block_size} tokens)")
        self.blocks = BlockManager(runner.num_blocks, runner.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens),
                                   self.blocks)
        eos = config.eos_token_ids
        if eos is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos = [] if eos is None else [eos]
        self.eos_ids = set(eos)
        self.seqs: dict[str, Sequence] = {}
        self.detok: dict[str, Detokenizer] = {}
        self.metrics = EngineMetrics()
        device = getattr(runner, "device", None)
        self.device_timer = DeviceTimer(device)
        accepts = getattr(runner, "accepts_pending_inputs", False)
        if config.async_scheduling and not accepts:
            raise ValueError(f"async_scheduling needs a runner that applies batch.pending "
                             f"(accepts_pending_inputs = True); {type(runner).__name__} does not: "
                             f"set async_scheduling=False")
        on_gpu = self.device_timer.on
        self.async_scheduling = (accepts and on_gpu if config.async_scheduling is None
                                 else config.async_scheduling)
        self.spec = None
        if config.speculative is not None:   # (draft_runner: the graph that drafts, if any)
            self.spec = SpecDecoder(config.speculative, None if draft_runner is None
                                    else self._proposer(config.speculative, draft_runner))
            # Steps in which nothing drafts run asynchronously (step()) when the drafter can
            # take up a sequence after tokens it did not see being made.
            if self.async_scheduling and not getattr(self.spec.proposer, "async_between_drafts", False):
                if config.async_scheduling:
                    raise ValueError(f"speculative decoding ({config.speculative}) drafts from "
                                     f"every step's outputs, which async scheduling has not read "
                                     f"yet: set async_scheduling=False (--no-async-scheduling) or "
                                     f"drop --speculative")
                self.async_scheduling = False
            self.spec.pause_without_drafts = self.async_scheduling
        self._inflight: _InFlight | None = None
        self._timers = (self.device_timer, DeviceTimer(device))   # alternate: two steps at once
        self._token_copies = None   # likewise: per timer, pinned host memory and an event (CUDA)
        self.metrics.bind(self.blocks.num_used_blocks, self.blocks.usage,
                          lambda: len(self.scheduler.running), lambda: len(self.scheduler.waiting))
        if self.spec is not None:
            self.metrics.bind_spec(self.spec.stats)
        self._preemptions_seen = 0

    def _proposer(self, speculative: SpeculativeConfig, draft_runner: ModelRunner):
        """The drafter that runs `draft_runner`: a draft model keeps its KV in a pool of its
        own (spec_draft); layerskip's draft graph writes the kept layers' KV in this engine's
        blocks."""
        if speculative.method == "draft":
            from .spec_draft import DraftModelProposer
            return DraftModelProposer(draft_runner, self.runner.vocab_size)
        if speculative.method == "mtp":   # the model's MTP module, in this engine's blocks
            from .spec_mtp import MTPProposer
            return MTPProposer(draft_runner, self.blocks)
        from .spec_decode import LayerSkipProposer
        return LayerSkipProposer(draft_runner, self.blocks)

    # -- requests -----------------------------------------------------------------------------
    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError if the request can never run (cheap, no engine state)."""
        check_request(prompt_ids, params, self.runner.vocab_size, self.max_model_len)

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        self.check_request(prompt_ids, params)
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting} requests)")
        seq = Sequence(prompt_ids, params, request_id)
        if seq.request_id in self.seqs:
            raise RequestError(f"duplicate request id {seq.request_id!r}")
        self.seqs[seq.request_id] = seq
        self.detok[seq.request_id] = Detokenizer(self.tokenizer, seq.token_ids, params.stop)
        self.scheduler.add(seq)
        return seq.request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Drop a request and free its blocks; its final output, or None if unknown/finished."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        self._finish(seq, "abort")
        return RequestOutput(request_id, "", [], True, "abort", self._usage(seq))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    # -- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if not self.async_scheduling:
            return self._step_sync()
        try:
            if self.spec is not None and self.spec.may_draft(self.scheduler.running):
                # Drafts come from the last tokens: finish the step in flight, then draft and
                # verify in a synchronous step.
                return self._finish_inflight() + self._step_sync()
            return self._step_async()
        except BaseException:
            self._inflight = None   # its sequences are aborted by the caller
            raise

    def _step_sync(self) -> list[RequestOutput]:
        clock = time.perf_counter
        t_start = clock()
        if self.spec is not None:
            self.spec.propose(self.scheduler.running)
        step = self.scheduler.schedule()
        self._count_preemptions()
        if step is None:
            return []
        t_scheduled = clock()
        if step.drafts is not None and self.config.invariant_verify:
            step.batch.invariant = True
        self.device_timer.start()
        logits = self.runner.execute(step.batch)
        t_forward = clock()
        if step.drafts is not None:
            return self._verify(step, logits, [t_start, t_scheduled, t_forward])
        seqs, tokens = self._sample(step, logits, self.scheduler.advance(step))
        self.device_timer.stop()
        tokens = tokens.tolist() if tokens is not None else []   # the step's one wait for the device
        t_sampled = clock()
        outputs = [self._append(seq, tok) for seq, tok in zip(seqs, tokens)]
        self.metrics.generation_tokens.inc(len(outputs))
        self.metrics.observe_step([t_start, t_scheduled, t_forward, t_sampled, clock()],
                                  step.batch.num_seqs, step.batch.num_tokens, self.device_timer.seconds())
        return outputs

    def _verify(self, step: ScheduledStep, logits, times: list[float]) -> list[RequestOutput]:
        """The rest of a step in which some sequences verified drafts: accept, append each
        sequence's new tokens (several for one with accepted drafts: one output holds them),
        count the accepted drafts as computed and free the blocks of the rejected ones."""
        ready = self.scheduler.advance(step)
        if not all(ready):   # rows of prefill chunks that sample nothing
            keep = np.repeat(ready, [1 + len(d) for d in step.drafts])
            logits = logits.index_select(0, to_device(np.flatnonzero(keep), logits.device))
        seqs = list(itertools.compress(step.seqs, ready))
        drafts = list(itertools.compress(step.drafts, ready))
        for s in seqs:
            if s.params.seed is not None and s.generator is None:
                s.generator = make_generator(s.params.seed, logits.device)
        accepted = self.spec.accept(logits, seqs, drafts)
        self.device_timer.stop()
        times.append(time.perf_counter())
        outputs = []
        for seq, draft, tokens in zip(seqs, drafts, accepted):
            out = None
            for token in tokens:
                one = self._append(seq, token)
                if out is None:
                    out = one
                else:
                    merge_outputs(out, one)
                if one.finished:
                    break
            outputs.append(out)
            if draft:
                self.metrics.spec_draft_tokens.inc(len(draft))
                self.metrics.spec_accepted_tokens.inc(len(tokens) - 1)
                if seq.status is Status.RUNNING:
                    seq.num_computed += len(tokens) - 1   # the accepted drafts' KV stands
                    self.blocks.commit(seq)
                    self.blocks.trim(seq, seq.num_tokens)
            seq.draft = []
        self.metrics.generation_tokens.inc(sum(len(o.token_ids) for o in outputs))
        self.metrics.observe_step(times + [time.perf_counter()], step.batch.num_seqs,
                                  step.batch.num_tokens, self.device_timer.seconds())
        return outputs

    def _step_async(self) -> list[RequestOutput]:
        clock = time.perf_counter
        t_start = clock()
        step = self.scheduler.schedule()
        self._count_preemptions()
        t_scheduled = clock()
        prev = self._inflight
        self._inflight = self._launch(step, prev) if step is not None else None
        return self._read(prev, [t_start, t_scheduled, clock()])

    def _finish_inflight(self) -> list[RequestOutput]:
        """The outputs of the step in flight (waiting for it); none is in flight after."""
        prev, self._inflight = self._inflight, None
        now = time.perf_counter()
        return self._read(prev, [now, now, now])

    def _read(self, prev: "_InFlight | None", times: list[float]) -> list[RequestOutput]:
        """Read the tokens of the launched step `prev` (None: nothing) and emit them; `times`:
        the clock at this step's start, after scheduling and after launching."""
        if prev is None:
            return []
        clock = time.perf_counter
        t_start, t_scheduled, t_forward = times
        tokens = prev.read_tokens()   # waits for step N only
        t_sampled = clock()
        outputs = []
        commit = self.blocks.commit
        for seq, index, token in zip(prev.seqs, prev.indices, tokens):
            if seq.status is Status.FINISHED:   # aborted, or stopped at its previous token
                continue
            last = seq.last_token_time
            seq.resolve(index, token)
            if seq.status is Status.RUNNING:
                commit(seq)
            outputs.append(self._emit(seq, token, index, last))
        for seq in prev.chunks:   # (their blocks are hashed only now)
            if seq.status is Status.RUNNING:
                commit(seq)
        self.metrics.generation_tokens.inc(len(outputs))
        batch = prev.step.batch
        self.metrics.observe_step([t_start, t_scheduled, t_forward, t_sampled, clock()],
                                  batch.num_seqs, batch.num_tokens, prev.timer.seconds())
        return outputs

    def _launch(self, step: ScheduledStep, prev: _InFlight | None) -> _InFlight:
        """Run `step` on the device and sample its tokens there; nothing waits. Inputs that
        `prev` samples are filled in on the device (batch.pending)."""
        batch = step.batch
        if prev is not None:
            # A pending input is the last new token of its sequence (prev sampled it).
            ends = batch.query_start.numpy()[1:] - 1
            waiting = np.flatnonzero(batch.input_ids.numpy()[ends] == PENDING).tolist()
            if waiting:
                row_of, seqs = prev.row_of, step.seqs
                batch.pending = PendingInputs(ends[waiting], [row_of[seqs[i]] for i in waiting], prev.tokens)
        slot = 1 if prev is not None and prev.timer is self._timers[0] else 0
        timer = self._timers[slot]
        timer.start()
        logits = self.runner.execute(batch)
        # (blocks are hashed once the tokens are read)
        ready = self.scheduler.advance(step, commit=False)
        seqs, tokens = self._sample(step, logits, ready)
        timer.stop()
        host_tokens = copied = None
        if tokens is not None and tokens.device.type == "cuda":
            # (reused: the step that last had this slot was read before this one launched)
            if self._token_copies is None:
                n = self.config.max_num_seqs
                self._token_copies = [(torch.empty(n, dtype=torch.int64, pin_memory=True), torch.cuda.Event())
                                      for _ in self._timers]
            pinned, copied = self._token_copies[slot]
            host_tokens = pinned[:len(tokens)]
            host_tokens.copy_(tokens, non_blocking=True)
            copied.record()
        indices = []
        for seq in seqs:
            index = seq.append_pending()
            indices.append(index)
            if index + 1 >= seq.max_num_tokens:
                seq.final = True   # ends at this token whatever it is: plan no more for it
        chunks = [] if len(seqs) == len(ready) else [s for s, r in zip(step.seqs, ready) if not r]
        return _InFlight(step, seqs, indices, dict(zip(seqs, range(len(seqs)))), chunks, tokens, timer,
                         host_tokens, copied)

    def _sample(self, step: ScheduledStep, logits, ready: list[bool]) -> tuple[list[Sequence], object]:
        """The sequences whose logits are for a new token, and their tokens sampled on the
        device (None if there are none); nothing waits for the device."""
        seqs = list(itertools.compress(step.seqs, ready))
        if not seqs:
            return seqs, None
        for s in seqs:
            if s.params.seed is not None and s.generator is None:
                s.generator = make_generator(s.params.seed, logits.device)
        if len(seqs) < logits.shape[0]:   # (a decode step needs every row: no gather)
            logits = logits.index_select(0, to_device(np.flatnonzero(ready), logits.device))
        return seqs, sample_on_device(logits, [s.params for s in seqs], [s.generator for s in seqs])

    def _append(self, seq: Sequence, token: int) -> RequestOutput:
        last = seq.last_token_time
        seq.append(token)
        return self._emit(seq, token, seq.num_tokens - 1, last)

    def _emit(self, seq: Sequence, token: int, index: int, last: float | None) -> RequestOutput:
        """The output for `token`, at `index` of the sequence's tokens (the host read it
        now; `last`: when the previous one was read); finishes the sequence if it stops."""
        m, p = self.metrics, seq.params
        if last is None:
            m.ttft.observe(seq.first_token_time - seq.arrival_time)
            m.prompt_tokens.inc(seq.num_prompt_tokens)
            m.cached_tokens.inc(seq.num_cached_tokens)
        else:
            m.itl.observe(seq.last_token_time - last)
        detok = self.detok[seq.request_id]
        if token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
            reason, text = "stop", detok.flush()
        else:
            text = detok.add(token)
            if detok.stopped:
                reason = "stop"
            elif index + 1 >= seq.max_num_tokens:   # (check_request keeps it within max_model_len)
                reason, text = "length", text + detok.flush()
            else:
                return RequestOutput(seq.request_id, text, [token])
        self._finish(seq, reason)
        return RequestOutput(seq.request_id, text, [token], True, reason, self._usage(seq))

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.drop_pending()
        self.scheduler.finish(seq, reason)
        if self.spec is not None:
            self.spec.release(seq)
        del self.seqs[seq.request_id], self.detok[seq.request_id]
        self.metrics.requests.labels(reason).inc()
        self.metrics.e2e.observe(time.monotonic() - seq.arrival_time)

    def _usage(self, seq: Sequence) -> Usage:
        return Usage(seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_tokens)

    def _count_preemptions(self) -> None:
        n = self.scheduler.num_preemptions
        if n > self._preemptions_seen:
            self.metrics.preemptions.inc(n - self._preemptions_seen)
            self._preemptions_seen = n

    # -- convenience --------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts to completion; one output per prompt with the whole text and tokens."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        results = {i: RequestOutput(i, "") for i in ids}
        while self.has_unfinished():
            for out in self.step():
                merge_outputs(results[out.request_id], out)
        return [results[i] for i in ids]


def serve_commands(eng: LLMEngine, next_command: Callable[[bool], tuple | None],
                   emit: Callable[[list], None], stopped: Callable[[], bool]) -> None:
    """The engine loop, in whatever thread or process holds the engine: take the commands
    waiting (`next_command(block)` blocks only while there is nothing to run), run a step,
    `emit` its (request id, output) pairs; until `stopped()`. A failed step aborts the
    requests in flight with an EngineStepError and the loop goes on. While nothing runs,
    the runner's background work (`capture_in_background`: CUDA graphs left out of
    start-up) goes on one piece at a time, between looks for commands."""
    background = getattr(eng.runner, "capture_in_background", None)
    while not stopped():
        cmd = next_command(not eng.has_unfinished() and background is None)
        while cmd is not None:
            kind, arg = cmd
            if kind == "add":
                prompt_ids, params, rid = arg
                try:
                    eng.add_request(prompt_ids, params, rid)
                except (RequestError, QueueFullError) as e:
                    emit([(rid, e)])
            elif kind == "abort":
                out = eng.abort(arg)
                if out is not None:
                    emit([(arg, out)])
            cmd = next_command(False)
        if stopped():
            continue
        if not eng.has_unfinished():
            try:
                if background is not None and not background():
                    background = None   # all done: block for commands again
            except Exception:   # noqa: BLE001 - what is left is captured on first use
                log.exception("background work of the runner failed; it stops")
                background = None
            continue
        try:
            outputs = eng.step()
        except Exception as e:   # a runner failure must not kill the server
            log.exception("engine step failed; aborting the requests in flight")
            failed = EngineStepError(f"model step failed: {e!r}")
            rids = list(eng.seqs)
            for rid in rids:
                eng.abort(rid)
            emit([(rid, failed) for rid in rids])
            continue
        t0 = time.perf_counter()
        emit([(out.request_id, out) for out in outputs])
        eng.metrics.phase["deliver"].observe(time.perf_counter() - t0)


class AsyncEngine(EngineClient):
    """Runs an LLMEngine's step loop in a daemon thread of this process."""

    def __init__(self, engine: LLMEngine):
        super().__init__(engine.tokenizer, engine.max_model_len, engine.runner.vocab_size,
                         engine.config.max_waiting)
        self.engine = engine
        self.metrics = engine.metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="kiln-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + self._inbox.qsize()

    def _send(self, command: tuple) -> None:
        self._inbox.put(command)

    async def metrics_text(self) -> bytes:
        return self.metrics.render()

    def _loop(self) -> None:
        def next_command(block: bool):
            try:
                return self._inbox.get(timeout=None) if block else self._inbox.get_nowait()
            except queue.Empty:
                return None
        serve_commands(self.engine, next_command, self._deliver, self._stop.is_set)
        for rid in list(self.engine.seqs):   # shut down: nobody may wait forever
            self.engine.abort(rid)
        self._fail_all(EngineStepError("the engine was shut down"))
