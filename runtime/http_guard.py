"""What one HTTP client can make the server do, bounded; and errors in OpenAI's shape.

- `ServerLimits`: the request body size, the prompt's characters before tokenization, the
  stop strings (count and length), the JSON nesting depth and number of arrays/objects.
- `GuardMiddleware` (plain ASGI, outermost): answers 413 from the Content-Length header
  before any of the body is read, and keeps /docs, /redoc and /openapi.json behind the
  API key. `read_body` counts the bytes of a body streamed without a length and stops at
  the limit with the same 413.
- `parse_body`: strict UTF-8; at most `max_json_containers` arrays and objects, nested at
  most `max_json_depth` deep, both counted on the raw text before parsing; JSON; then
  strings that are not Unicode text (lone UTF-16 surrogates from escapes like "\\ud800")
  refused. It runs in a worker thread (see server.py). The container count matters for
  the event loop, not just memory: arrays and objects are what Python's cyclic garbage
  collector traverses, and one collection over a million fresh lists holds the GIL for
  hundreds of milliseconds, whichever thread parsed them. Numbers and strings are not
  traversed, so a long array of token ids costs nothing there.
- `APIError` renders `{"error": {"message", "type", "param", "code"}}` as ASCII JSON (so no
  client string can make rendering fail); 413 and 5xx answers carry `Connection: close`.
"""
from __future__ import annotations

import hmac
import json
import re
from dataclasses import dataclass

from fastapi.responses import JSONResponse

DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
PROMPT_CHARS_PER_TOKEN = 64


@dataclass
class ServerLimits:
    max_body_bytes: int = 4 * 2**20          # request body (413 beyond)
    max_prompt_chars: int | None = None      # characters tokenized; None: 64 per context token
    max_stop_strings: int = 16
    max_stop_chars: int = 1024               # per stop string
    max_json_depth: int = 64                 # nested arrays/objects in the body
    max_json_containers: int = 10_000        # arrays and objects in the body

    def prompt_chars(self, max_model_len: int) -> int:
        if self.max_prompt_chars is not None:
            return self.max_prompt_chars
        return PROMPT_CHARS_PER_TOKEN * max_model_len

    def validate(self) -> "ServerLimits":
        for name in ("max_body_bytes", "max_stop_strings", "max_stop_chars", "max_json_depth",
                     "max_json_containers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"server limit {name} must be a positive integer, got {v!r}")
        if self.max_prompt_chars is not None and (not isinstance(self.max_prompt_chars, int)
                                                  or self.max_prompt_chars < 1):
            raise ValueError(f"server limit max_prompt_chars must be a positive integer, got "
                             f"{self.max_prompt_chars!r}")
        return self


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a lone surrogate in a string becomes
    the escape it came in as, instead of a UnicodeEncodeError while rendering."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict | None:
        if self.status == 429:
            return {"Retry-After": "1"}
        if self.status == 413 or self.status >= 500:   # the connection is not reusable / suspect
            return {"Connection": "close"}
        return None

    def response(self) -> JSONResponse:
        return AsciiJSONResponse(self.body(), status_code=self.status, headers=self.headers())


def clip(s: str, n: int = 100) -> str:
    """A client string for an error message: at most `n` characters."""
    return s if len(s) <= n else s[:n] + f"... ({len(s)} characters)"


def body_too_large(limit: int, size: int | None = None) -> APIError:
    got = f" ({size} bytes)" if size is not None else ""
    return APIError(413, f"the request body is larger than this server's limit of {limit} bytes{got}; "
                         f"send a smaller request (the server's --max-body-bytes sets the limit)",
                    code="request_too_large")


def authorized(headers, expected: bytes | None) -> bool:
    """`Authorization: Bearer <key>`, compared in constant time (raw header bytes)."""
    if expected is None:
        return True
    got = b""
    for k, v in headers:
        if k == b"authorization":
            got = v
    return hmac.compare_digest(got, expected)


def unauthorized() -> APIError:
    return APIError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                    "authentication_error", code="invalid_api_key")


class GuardMiddleware:
    """Outermost ASGI layer: the Content-Length check (413 before the body is read) and the
    API key on the documentation paths."""

    def __init__(self, app, max_body_bytes: int, expected_auth: bytes | None):
        self.app, self.max_body_bytes, self.expected_auth = app, max_body_bytes, expected_auth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = None
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    size = int(v)
                except ValueError:
                    error = APIError(400, "the Content-Length header is not a number")
                    break
                if size > self.max_body_bytes:
                    error = body_too_large(self.max_body_bytes, size)
                    break
        if error is None and scope["path"] in DOCS_PATHS and not authorized(scope["headers"],
                                                                            self.expected_auth):
            error = unauthorized()
        if error is not None:
            return await error.response()(scope, receive, send)
        return await self.app(scope, receive, send)


async def read_body(request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as more than `limit` bytes arrived."""
    from starlette.requests import ClientDisconnect
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise body_too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:   # nobody to answer; an ordinary 4xx keeps it out of the error log
        raise APIError(400, "the client disconnected before sending the whole request body") from None
    return b"".join(chunks)


# A JSON string (possibly unterminated), or one bracket.
_TOKEN = re.compile(rb'"(?:[^"\\]++|\\.)*+"?|([\[{])|([\]}])', re.DOTALL)
# An escape that may decode to a lone surrogate (only escapes can: the UTF-8 is strict).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_body(raw: bytes, max_depth: int, max_containers: int = 10_000) -> dict:
    """The request body as a JSON object, or an APIError (400) naming what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                            f"{e.start}); send JSON encoded as UTF-8") from None
    brackets = raw.count(b"[") + raw.count(b"{")
    if brackets > max_depth or brackets > max_containers:   # else neither limit can be passed
        check_structure(raw, max_depth, max_containers)
    try:
        body = json.loads(text)
    except RecursionError:
        raise _too_deep(max_depth, None) from None
    except ValueError as e:   # JSONDecodeError, and integers longer than Python converts
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw):
        check_text(body)
    return body


def check_structure(raw: bytes, max_depth: int, max_containers: int) -> None:
    """Counts arrays and objects, and their nesting, outside strings. A Python loop over the
    tokens: slow on pathological bodies, but it yields the GIL (it runs in a worker)."""
    depth = count = 0
    for m in _TOKEN.finditer(raw):
        if m.lastindex == 1:
            depth += 1
            count += 1
            if depth > max_depth:
                raise _too_deep(max_depth, None)
            if count > max_containers:
                raise APIError(400, f"the request body holds more than {max_containers} JSON arrays "
                                    f"and objects; send fewer (a prompt of token ids is one array)")
        elif m.lastindex == 2:
            depth -= 1


def _too_deep(max_depth: int, path) -> APIError:
    where = f" (at {_path(path)})" if path is not None else ""
    return APIError(400, f"the request body is nested too deeply{where}; this server accepts JSON "
                         f"nested at most {max_depth} levels", param=_path(path))


def check_text(body: dict) -> None:
    """Every string of the parsed body, keys too, is Unicode text (no lone surrogates).

    Only arrays and objects go on the work stack, and a string's path is built only when it
    is refused: one tuple per string of a million-string prompt would be a million fresh
    objects for the cyclic garbage collector, whose full collection then holds the GIL."""
    stack = [(body, None)]     # (array or object, its path as (parent path, key))
    while stack:
        v, path = stack.pop()
        items = v.items() if isinstance(v, dict) else enumerate(v)
        for k, x in items:
            if isinstance(k, str) and not _is_text(k):
                raise _lone_surrogate(k, (path, k))
            if isinstance(x, str):
                if not _is_text(x):
                    raise _lone_surrogate(x, (path, k))
            elif isinstance(x, (dict, list)):
                stack.append((x, (path, k)))


def _is_text(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _lone_surrogate(s: str, path) -> APIError:
    e = next(i for i, c in enumerate(s) if 0xD800 <= ord(c) <= 0xDFFF)
    where = _path(path) or "the body"
    return APIError(400, f"{where} contains a lone UTF-16 surrogate ({ascii(s[e])[1:-1]}), "
                         f"which is not Unicode text; escape characters outside the BMP as a "
                         f"surrogate pair or send them as UTF-8", param=_path(path))


def _path(path) -> str | None:
    """'messages[0].content' from the linked (parent, key) path."""
    keys = []
    while path is not None:
        path, k = path
        keys.append(k)
    out = ""
    for k in reversed(keys):
        if isinstance(k, int):
            out += f"[{k}]"
        else:
            k = k if _is_text(k) else ascii(k)[1:-1]
            out += ("." if out else "") + clip(k, 40)
    return out or None

