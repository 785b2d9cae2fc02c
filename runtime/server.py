"""OpenAI-compatible HTTP server over an AsyncEngine.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream`), GET
/v1/models, /health, /metrics. Every request is validated by hand, so that any bad input
gets an OpenAI-style error body `{"error": {"message", "type", "param", "code"}}` with a 4xx
status, never a 500. A watcher per request polls the connection and aborts the request
(freeing its KV blocks) as soon as the client goes away, streaming or not.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import AsyncEngine, QueueFullError, RequestError, RequestStream
from .sequence import SamplingParams

DISCONNECT_POLL_S = 0.1


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# -- request parsing ------------------------------------------------------------------------------
_NUM = (int, float)


def _get(body: dict, name: str, types, default=None, what: str = ""):
    """body[name] if present and not null, checked against `types` (bool is not a number)."""
    v = body.get(name)
    if v is None:
        return default
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
        raise APIError(400, f"'{name}' must be {what or _kind(types)}, got {json.dumps(v)[:80]}", param=name)
    if isinstance(v, float) and not math.isfinite(v):
        raise APIError(400, f"'{name}' must be a finite number", param=name)
    return v


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
            raise APIError(400, f"'{name}' = {json.dumps(v)[:80]} is not supported by this server", param=name)


def _sampling(body: dict, max_tokens: int | None) -> SamplingParams:
    if _get(body, "n", int, 1) != 1:
        raise APIError(400, "only n = 1 is supported", param="n")
    stop = _get(body, "stop", (str, list), [], "a string or an array of strings")
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 16 or any(not isinstance(s, str) or not s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or up to 16 non-empty strings", param="stop")
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


def _prompt_ids(body: dict, tokenizer, vocab: int) -> list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]                                  # a batch of one
    if isinstance(p, str):
        ids = _encode(tokenizer, p, True)
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


def _chat_ids(body: dict, tokenizer) -> list[int]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    conv = []
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
        conv.append({"role": m["role"], "content": content})
    try:
        text = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    except Exception as e:   # template errors (e.g. raise_exception on a bad role order) are the user's
        raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
    return _encode(tokenizer, text, False)


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    try:
        return tokenizer.encode(text, add_special_tokens=special)
    except Exception as e:   # e.g. lone surrogates from a "\\ud800" escape
        raise APIError(400, f"the text cannot be tokenized: {e}", param="prompt") from None


# -- the app --------------------------------------------------------------------------------------
def create_app(engine: AsyncEngine, model_name: str, api_key: str | None = None,
               max_model_len: int | None = None) -> FastAPI:
    max_len = min(max_model_len or engine.max_model_len, engine.max_model_len)
    tok = engine.tokenizer
    vocab = engine.engine.runner.vocab_size
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="kiln", lifespan=lifespan)

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
        if api_key is not None and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", code="invalid_api_key")

    async def parse(request: Request) -> dict:
        auth(request)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, "'model' is required (a string)", param="model")
        if model != model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        return body

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

    async def generate(request: Request, chat: bool):
        body = await parse(request)
        _unsupported(body)
        streaming = _get(body, "stream", bool, False)
        with_usage = _get(_get(body, "stream_options", dict, {}), "include_usage", bool, False)
        # Extension (as in vLLM): each choice / chunk also carries the generated token ids.
        with_ids = _get(body, "return_token_ids", bool, False)
        ids = _chat_ids(body, tok) if chat else _prompt_ids(body, tok, vocab)
        params = _sampling(body, _max_tokens(body, chat, len(ids), max_len))
        stream = submit(ids, params)   # nothing after this may reject the request
        return await respond(request, stream, chat, streaming, with_usage, with_ids)

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
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

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
    import uvicorn
    uvicorn.run(app, host=host, port=port, log_level=log_level)
