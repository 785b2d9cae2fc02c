"""The engine in a process of its own: the server's interpreter lock is no longer the engine's.

With the engine in a thread of the server's process, every step waits for the event loop
to let go of the GIL, and the event loop streams a chunk to every client every step: at
hundreds of streams the two take turns instead of running side by side. `EngineProcess`
builds the engine in a child (spawned, so CUDA starts clean there) from a factory
function and drives it over a pipe:

- to the child: ("add", (prompt ids, params, id)), ("abort", id), ("metrics", None),
  ("stop", None);
- from the child: ("ready", info) or ("failed", exception, traceback) once, then
  ("out", [(request id, output as a tuple, or error)], waiting, adds handled) after
  every step,
  ("metrics", text) in answer, ("stopped",) at the end.

A reader thread hands each batch of outputs to the streams (EngineClient._deliver). The
child runs the same loop as the in-process engine (engine.serve_commands). If the child
dies, every open stream gets an EngineStepError, and `failure` says so: /health answers
503 and new requests are refused.
"""
from __future__ import annotations

import asyncio
import collections
import gc
import multiprocessing
import pickle
import signal
import threading
import traceback
from typing import TYPE_CHECKING, Callable

from .client import EngineClient, EngineStepError, RequestOutput, Usage

if TYPE_CHECKING:
    from .engine import LLMEngine


class EngineStartError(RuntimeError):
    """The factory failed in the child with an exception that cannot cross the pipe."""


class EngineProcess(EngineClient):
    """`factory(*args)` runs in the child and returns (LLMEngine, info): `info` is a
    picklable dict handed back as `self.info` (e.g. the served model's name). The
    constructor returns once the engine is built, or raises what the factory raised."""

    def __init__(self, factory: Callable[..., tuple[LLMEngine, dict]], *args):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(child, factory, args), name="kiln-engine",
                                 daemon=True)
        self._proc.start()
        child.close()
        try:
            msg = self._conn.recv()
        except EOFError:
            self._proc.join()
            raise EngineStartError(f"the engine process exited while starting (exit code "
                                   f"{self._proc.exitcode})") from None
        if msg[0] == "failed":
            self._proc.join()
            raise msg[1]
        ready = msg[1]
        super().__init__(ready["tokenizer"], ready["max_model_len"], ready["vocab_size"],
                         ready["max_waiting"])
        self.info = ready["info"]
        self._lock = threading.Lock()   # sends come from the event loop and the reader thread
        self._adds_sent = self._adds_handled = self._waiting = 0
        self._metrics: collections.deque = collections.deque()   # (loop, future) per request
        self._failure: str | None = None
        self._reader = threading.Thread(target=self._read, name="kiln-engine-reader", daemon=True)
        self._reader.start()

    def start(self) -> None:
        pass   # running since the constructor

    def shutdown(self, timeout: float = 5.0) -> None:
        try:
            self._send(("stop", None))
        except EngineStepError:
            pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout)
        self._reader.join(timeout)

    def num_waiting(self) -> int:
        return self._waiting + self._adds_sent - self._adds_handled

    def abort(self, request_id: str) -> None:
        try:
            self._send(("abort", request_id))
        except EngineStepError:
            pass   # nothing runs any more

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _send(self, command: tuple) -> None:
        with self._lock:
            if self._failure is not None:
                raise EngineStepError(self._failure)
            try:
                self._conn.send(command)
            except (OSError, ValueError):   # the pipe is closed: the reader reports why
                raise EngineStepError("the engine process is gone") from None
            if command[0] == "add":
                self._adds_sent += 1

    async def metrics_text(self) -> bytes:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:   # replies come in the order of the requests
            self._metrics.append((loop, future))
        try:
            self._send(("metrics", None))
        except EngineStepError:
            with self._lock:
                self._metrics.remove((loop, future))
            raise
        return await future

    def _read(self) -> None:
        stopped = False   # the child said it stopped: a shutdown, however long its exit takes
        try:
            while True:
                msg = self._conn.recv()
                if msg[0] == "out":
                    _, pairs, self._waiting, self._adds_handled = msg
                    self._deliver([(rid, _from_wire(rid, item)) for rid, item in pairs])
                elif msg[0] == "metrics":
                    with self._lock:
                        loop, future = self._metrics.popleft()
                    loop.call_soon_threadsafe(_resolve, future, msg[1], None)
                elif msg[0] == "stopped":
                    stopped = True
                    break
        except (EOFError, OSError):
            pass
        self._proc.join(5)
        code = self._proc.exitcode
        with self._lock:
            self._failure = ("the engine was shut down" if stopped or code == 0 else
                             f"the engine process exited unexpectedly (exit code {code}); restart "
                             f"the server")
            waiters, self._metrics = list(self._metrics), collections.deque()
        for loop, future in waiters:
            loop.call_soon_threadsafe(_resolve, future, None, EngineStepError(self._failure))
        self._fail_all(EngineStepError(self._failure))


def _resolve(future: asyncio.Future, value, error) -> None:
    if not future.done():
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


# Outputs cross the pipe as plain tuples: pickling a step's 256 RequestOutput dataclasses
# took 160 us and unpickling them 650 us, as tuples 24 and 32.
def _to_wire(item):
    if isinstance(item, BaseException):
        return item
    u = item.usage
    return (item.text, item.token_ids, item.finished, item.finish_reason,
            None if u is None else (u.prompt_tokens, u.completion_tokens, u.cached_tokens))


def _from_wire(rid: str, item):
    if isinstance(item, BaseException):
        return item
    text, token_ids, finished, reason, usage = item
    return RequestOutput(rid, text, token_ids, finished, reason,
                         None if usage is None else Usage(*usage))


def _child_main(conn, factory, args) -> None:
    # The server decides when the engine stops (Ctrl-C reaches the whole process group).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine, info = factory(*args)
    except BaseException as e:   # noqa: BLE001 - the parent raises it (or says why it cannot)
        tb = traceback.format_exc()
        try:
            pickle.dumps(e)
        except Exception:   # noqa: BLE001
            e = EngineStartError(f"building the engine failed in the engine process:\n{tb}")
        conn.send(("failed", e, tb))
        return
    # What start-up built (torch, the model, the tokenizer: ~400k objects, 0.2 s a full
    # collection on a 2-core CPU) moves
    # out of the collector's reach: a full collection while serving then scans only what
    # serving allocates, not everything, and stalls a step for far less.
    gc.collect()
    gc.freeze()
    conn.send(("ready", {"tokenizer": engine.tokenizer, "max_model_len": engine.max_model_len,
                         "vocab_size": engine.runner.vocab_size,
                         "max_waiting": engine.config.max_waiting, "info": info}))
    handled, stop = 0, False

    def next_command(block: bool):
        nonlocal handled, stop
        try:
            while not stop and conn.poll(None if block else 0):
                kind, arg = conn.recv()
                if kind == "metrics":
                    conn.send(("metrics", engine.metrics.render()))
                elif kind == "stop":
                    stop = True
                else:
                    handled += kind == "add"
                    return kind, arg
        except (EOFError, OSError):   # the server is gone
            stop = True
        return None

    def emit(pairs: list) -> None:
        conn.send(("out", [(rid, _to_wire(x)) for rid, x in pairs], len(engine.scheduler.waiting),
                   handled))

    from .engine import serve_commands
    serve_commands(engine, next_command, emit, lambda: stop)
    for rid in list(engine.seqs):
        engine.abort(rid)
    try:
        conn.send(("stopped",))
    except OSError:
        pass
