"""OpenAI-compatible HTTP server over an EngineClient (the engine in a thread or its own process).

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream`), GET
/v1/models, /health, /metrics; /docs, /redoc and /openapi.json only with `docs=True`
(`kiln serve --docs`), behind the API key like /v1. Every request is validated by hand,
so that any bad input gets an OpenAI-style error body `{"error": {"message", "type",
"param", "code"}}` with a 4xx status, never a 500; a genuine 500 carries `Connection:
close`. A watcher per request polls the connection and aborts the request (freeing its KV
blocks) as soon as the client goes away, streaming or not.

Bounded work per request (`ServerLimits`, see http_guard): the body size (413 from the
Content-Length header before reading, or as soon as a streamed body passes it), the
prompt's characters before tokenization, the stop strings, the JSON nesting depth. Reading
the body is async; parsing it, validating it and tokenizing the prompt run in a small
worker pool (tokenizer calls one at a time), so the event loop, and with it /health and
every stream, keeps answering while one request carries a large prompt. API keys are
compared in constant time.
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from .client import EngineClient, EngineStepError, QueueFullError, RequestError, RequestStream
from .http_guard import (APIError, AsciiJSONResponse, GuardMiddleware, ServerLimits, authorized, clip,
                         parse_body, read_body, unauthorized)
from .sequence import SamplingParams

__all__ = ["APIError", "ServerLimits", "create_app", "serve"]

DISCONNECT_POLL_S = 0.1
WORKERS = 2   # threads that parse and tokenize request bodies


# -- request parsing ------------------------------------------------------------------------------
_NUM = (int, float)


def _get(body: dict, name: str, types, default=None, what: str = ""):
    """body[name] if present and not null, checked against `types` (bool is not a number)."""
    v = body.get(name)
    if v is None:
        return default
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
        raise APIError(400, f"'{name}' must be {what or _kind(types)}, got {_show(v)}", param=name)
    if isinstance(v, float) and not math.isfinite(v):
        raise APIError(400, f"'{name}' must be a finite number", param=name)
    return v


def _show(v) -> str:
    """A client value for an error message, at most 80 characters (and cheap when large)."""
    if isinstance(v, (list, dict)) and len(v) > 8:
        return f"{'an array' if isinstance(v, list) else 'an object'} of {len(v)} items"
    return json.dumps(v)[:80]


def _kind(types) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
             dict: "an object"}
    return "a number" if float in types else " or ".join(names.get(t, t.__name__) for t in types)


def _unsupported(body: dict) -> None:
    """Fields we do not implement: accepted only at their neutral value."""
    neutral = {"best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "logprobs": (None, False, 0), "top_logprobs": (None, 0), "logit_bias": (None, {}),
               "tools": (None, []), "tool_choice": (None, "none", "auto"),
               "response_format": (None, {"type": "text"})}
    for name, ok in neutral.items():
        v = body.get(name)
        if not any(v == o and type(v) is type(o) for o in ok) and v is not None:
            raise APIError(400, f"'{name}' = {_show(v)} is not supported by this server", param=name)


def _sampling(body: dict, max_tokens: int | None, limits: ServerLimits) -> SamplingParams:
    if _get(body, "n", int, 1) != 1:
        raise APIError(400, "only n = 1 is supported", param="n")
    stop = _get(body, "stop", (str, list), [], "a string or an array of strings")
    stop = [stop] if isinstance(stop, str) else stop
    n, chars = limits.max_stop_strings, limits.max_stop_chars
    if len(stop) > n or any(not isinstance(s, str) or not s for s in stop):
        raise APIError(400, f"'stop' must be a non-empty string or up to {n} non-empty strings", param="stop")
    if any(len(s) > chars for s in stop):
        longest = max(len(s) for s in stop)
        raise APIError(400, f"'stop' strings may have at most {chars} characters, got one of {longest}; "
                            f"shorten it", param="stop")
    params = SamplingParams(
        max_tokens=max_tokens, temperature=float(_get(body, "temperature", _NUM, 1.0)),
        top_p=float(_get(body, "top_p", _NUM, 1.0)), top_k=_get(body, "top_k", int, 0),
        seed=_get(body, "seed", int), stop=stop, ignore_eos=_get(body, "ignore_eos", bool, False))
    try:
        params.validate()
    except ValueError as e:
        raise APIError(400, str(e), param=getattr(e, "param", None)) from None
    return params


def _max_tokens(body: dict, chat: bool, prompt_len: int, max_model_len: int) -> int:
    v = _get(body, "max_tokens", int)
    if chat:
        v = _get(body, "max_completion_tokens", int, v)
    if v is None:   # OpenAI's default for completions; the rest of the context for chat
        v = 16 if not chat else max(1, max_model_len - prompt_len)
    if v < 1:
        raise APIError(400, f"'max_tokens' must be at least 1, got {v}", param="max_tokens")
    return v


class Tokenize:
    """The tokenizer for request threads: one call at a time (a fast tokenizer's settings are
    mutable state; concurrent calls can collide), prompts longer than `max_chars` refused
    before any tokenization."""

    def __init__(self, tokenizer, max_chars: int):
        self.tokenizer, self.max_chars = tokenizer, max_chars
        self.lock = threading.Lock()

    def check_length(self, n: int, what: str, param: str) -> None:
        if n > self.max_chars:
            raise APIError(400, f"{what} {n} characters; this server tokenizes at most {self.max_chars} "
                                f"(its --max-prompt-chars); shorten the prompt", param=param,
                           code="prompt_too_long")

    def encode(self, text: str, special: bool, param: str) -> list[int]:
        self.check_length(len(text), "the prompt has", param)
        try:
            with self.lock:
                return self.tokenizer.encode(text, add_special_tokens=special)
        except Exception as e:   # e.g. a character the tokenizer cannot handle
            raise APIError(400, f"the text cannot be tokenized: {clip(str(e), 200)}", param=param) from None

    def chat_template(self, conv: list[dict]) -> str:
        try:
            with self.lock:
                return self.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        except Exception as e:   # template errors (e.g. raise_exception on a bad role order) are the user's
            raise APIError(400, f"the chat template rejected the messages: {clip(str(e), 200)}",
                           param="messages") from None


def _prompt_ids(body: dict, tok: Tokenize, vocab: int) -> list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]                                  # a batch of one
    if isinstance(p, str):
        ids = tok.encode(p, True, "prompt")
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        ids = p
        if not all(0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    elif isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise APIError(400, "only one prompt per request is supported", param="prompt")
    else:
        raise APIError(400, "'prompt' must be a string or an array of token ids", param="prompt")
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    return ids


def _chat_ids(body: dict, tok: Tokenize) -> list[int]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    conv, chars = [], 0
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{i}] must be an object with a valid 'role'", param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):           # content parts: text only
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            content = "".join(c["text"] for c in content)
        if content is None and m["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or an array of text parts",
                           param=f"messages[{i}].content")
        chars += len(content)
        conv.append({"role": m["role"], "content": content})
    tok.check_length(chars, "the messages have", "messages")
    text = tok.chat_template(conv)
    tok.check_length(len(text), "the messages, rendered by the chat template, have", "messages")
    return tok.encode(text, False, "messages")


@dataclass
class _Parsed:
    """A validated request, ready for the engine."""
    ids: list[int]
    params: SamplingParams
    streaming: bool
    with_usage: bool
    with_ids: bool


# -- the app --------------------------------------------------------------------------------------
def create_app(engine: EngineClient, model_name: str, api_key: str | None = None,
               max_model_len: int | None = None, limits: ServerLimits | None = None,
               docs: bool = False) -> FastAPI:
    """The app. `limits` bounds each request (ServerLimits' defaults otherwise); `docs`
    serves /docs, /redoc and /openapi.json (behind `api_key` when there is one)."""
    limits = (limits or ServerLimits()).validate()
    max_len = min(max_model_len or engine.max_model_len, engine.max_model_len)
    tok = Tokenize(engine.tokenizer, limits.prompt_chars(max_len))
    vocab = engine.vocab_size
    created = int(time.time())
    expected_auth = f"Bearer {api_key}".encode() if api_key is not None else None
    pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="kiln-http")

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="kiln", lifespan=lifespan, default_response_class=AsciiJSONResponse,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.add_middleware(GuardMiddleware, max_body_bytes=limits.max_body_bytes, expected_auth=expected_auth)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _bug(request, exc):
        return APIError(500, f"internal error: {exc!r}", "server_error").response()

    def auth(request: Request) -> None:
        if not authorized(request.scope["headers"], expected_auth):
            raise unauthorized()

    def build(raw: bytes, chat: bool) -> _Parsed:
        """Everything between the body's bytes and the engine; runs in the worker pool."""
        body = parse_body(raw, limits.max_json_depth, limits.max_json_containers)
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, "'model' is required (a string)", param="model")
        if model != model_name:
            raise APIError(404, f"the model '{clip(model)}' does not exist; this server serves "
                                f"'{model_name}'", param="model", code="model_not_found")
        _unsupported(body)
        streaming = _get(body, "stream", bool, False)
        with_usage = _get(_get(body, "stream_options", dict, {}), "include_usage", bool, False)
        # Extension (as in vLLM): each choice / chunk also carries the generated token ids.
        with_ids = _get(body, "return_token_ids", bool, False)
        ids = _chat_ids(body, tok) if chat else _prompt_ids(body, tok, vocab)
        params = _sampling(body, _max_tokens(body, chat, len(ids), max_len), limits)
        return _Parsed(ids, params, streaming, with_usage, with_ids)

    def submit(prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        if len(prompt_ids) + params.max_tokens > max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, you "
                           f"requested {len(prompt_ids) + params.max_tokens} tokens ({len(prompt_ids)} in "
                           f"the prompt, {params.max_tokens} for the completion). Please reduce the "
                           f"prompt or max_tokens.", param="max_tokens", code="context_length_exceeded")
        try:
            return engine.add_request(prompt_ids, params)
        except RequestError as e:
            raise APIError(400, str(e), param=e.param, code=e.code) from None
        except QueueFullError as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        except EngineStepError as e:
            raise APIError(503, str(e), "server_error", code="engine_down") from None

    async def generate(request: Request, chat: bool):
        auth(request)
        raw = await read_body(request, limits.max_body_bytes)
        r = await asyncio.get_running_loop().run_in_executor(pool, build, raw, chat)
        stream = submit(r.ids, r.params)   # nothing after this may reject the request
        return await respond(request, stream, chat, r.streaming, r.with_usage, r.with_ids)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "kiln", "max_model_len": max_len}]}

    @app.get("/health")
    async def health():
        if engine.failure is not None:
            return APIError(503, engine.failure, "server_error", code="engine_down").response()
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        try:
            text = await engine.metrics_text()
        except EngineStepError as e:
            raise APIError(503, str(e), "server_error", code="engine_down") from None
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def respond(request: Request, stream: RequestStream, chat: bool, streaming: bool, with_usage: bool,
                      with_ids: bool = False):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model_name}
        watcher = asyncio.create_task(_watch_disconnect(request, stream))
        if not streaming:
            try:
                out = await stream.collect()
            except Exception as e:
                raise _engine_error(e) from None
            finally:
                watcher.cancel()
                stream.abort()
            choice = ({"index": 0, "message": {"role": "assistant", "content": out.text}} if chat
                      else {"index": 0, "text": out.text})
            choice.update(logprobs=None, finish_reason=out.finish_reason)
            if with_ids:
                choice["token_ids"] = out.token_ids
            return {**head, "choices": [choice], "usage": _usage(out.usage)}

        head["object"] = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False, ids=None) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": text or ""}
            choice.update(logprobs=None, finish_reason=finish)
            if with_ids:
                choice["token_ids"] = list(ids or [])
            data = {**head, "choices": [choice]}
            if with_usage:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            usage = None
            pending_ids: list[int] = []   # tokens whose text the detokenizer still holds
            try:
                if chat:
                    yield chunk(None, None, first=True)
                async for out in stream:
                    usage = out.usage
                    if out.finish_reason == "abort":
                        return
                    pending_ids += out.token_ids
                    if out.text or out.finished:
                        yield chunk(out.text or (None if chat else ""), out.finish_reason, ids=pending_ids)
                        pending_ids = []
                if with_usage and usage is not None:
                    yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(usage)})}\n\n"
                yield "data: [DONE]\n\n"
            except Exception as e:   # the headers are out: report in-band
                yield f"data: {json.dumps(_engine_error(e).body())}\n\n"
                yield "data: [DONE]\n\n"
            finally:   # also runs when the server cancels us because the client went away
                watcher.cancel()
                stream.abort()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app


def _engine_error(e: Exception) -> APIError:
    """An error that reached a request through its stream (raised in the engine thread)."""
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), "rate_limit_error", code="queue_full")
    if isinstance(e, RequestError):
        return APIError(400, str(e), param=e.param, code=e.code)
    return APIError(500, str(e), "server_error")


def _usage(u) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


async def _watch_disconnect(request: Request, stream: RequestStream) -> None:
    while not stream.finished:
        if await request.is_disconnected():
            stream.abort()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted (binds loopback unless told otherwise)."""
    import gc

    import uvicorn
    # Start-up's objects (torch, the tokenizer, with the engine in a thread the model too)
    # leave the collector's reach: otherwise a full collection, 0.2 s of scanning them,
    # now and then stalls every stream at once.
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=host, port=port, log_level=log_level)
