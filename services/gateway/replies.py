"""What the gateway answers over HTTP: JSON bodies, its two error shapes, and server-sent events.

Every error answer is JSON. SGLang's routes use `{"error": {"message", "type", "code"}}`
(`error_body`), the OpenAI routes `{"error": {"message", "type", "param", "code"}}`
(`openai_error_body`). An overload answer (429, 503) carries `Retry-After` unless the caller
gives its own headers. aiohttp's own errors (404, 405, 413, ...) and handler crashes are answered
in SGLang's shape by the `json_errors` middleware.

CORS as SGLang's server allows it: every origin. `cors` answers a preflight (`OPTIONS`, before
the API key check) and `allow_any_origin` puts `Access-Control-Allow-Origin: *` on every answer,
streamed ones included (it runs as the headers go out).

An event stream is `data: <json>\\n\\n` events ending with `data: [DONE]`; its headers go out only
once the handler knows the request started well, so an early error keeps its HTTP status.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

log = logging.getLogger("gateway")

MAX_BODY_BYTES = 8 * 1024 * 1024
TOO_LARGE = f"request body is larger than {MAX_BODY_BYTES} bytes"
RETRY_AFTER_S = "1"
SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_encoder = msgspec.json.Encoder()


def encode_json(obj: Any) -> bytes:
    return _encoder.encode(obj)


def timed_out(timeout: float) -> str:
    return f"request timed out after {timeout:g}s"


# --- JSON -------------------------------------------------------------------------------------


def error_body(message: str, status: int) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": status}}


def openai_error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    kind = {400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError"}.get(status)
    if kind is None:
        kind = "InternalServerError" if status >= 500 else "BadRequestError"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=encode_json(body), status=status, headers=headers, content_type="application/json")


def json_error(message: str, status: int, headers: dict[str, str] | None = None) -> web.Response:
    """SGLang's error answer; `headers`, when given, are all the headers it gets."""
    return _error_response(error_body(message, status), status, headers)


def openai_error(message: str, status: int, param: str | None = None) -> web.Response:
    return _error_response(openai_error_body(message, status, param), status, None)


def _error_response(body: dict[str, Any], status: int, headers: dict[str, str] | None) -> web.Response:
    if status in (429, 503) and headers is None:  # overload: tell the client when to come back
        headers = {"Retry-After": RETRY_AFTER_S}
    return json_response(body, status, headers)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, 413, ...) and crashes, answered as JSON."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 404:
            message = f"no route for {request.method} {request.path}"
        elif e.status == 405:
            message = f"method {request.method} is not allowed for {request.path}"
        else:
            message = e.reason
        headers = {k: v for k, v in e.headers.items() if k in ("Allow", "Retry-After")}
        return json_error(message, e.status, headers)
    except Exception:
        log.exception("handler failed %s %s", request.method, request.path)
        return json_error("internal server error", 500)


# --- CORS ------------------------------------------------------------------------------------

CORS_METHODS = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"
CORS_MAX_AGE_S = "600"


@web.middleware
async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answers a preflight: any origin, method and header may follow."""
    if request.method != "OPTIONS":
        return await handler(request)
    headers = {
        "Access-Control-Allow-Methods": CORS_METHODS,
        "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", "*"),
        "Access-Control-Max-Age": CORS_MAX_AGE_S,
    }
    return web.Response(status=200, text="OK", headers=headers)


async def allow_any_origin(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: every answer may be read by a page of any origin."""
    response.headers["Access-Control-Allow-Origin"] = "*"


# --- server-sent events -----------------------------------------------------------------------


def sse_event(obj: Any) -> bytes:
    return b"data: " + _encoder.encode(obj) + b"\n\n"


async def open_sse(request: web.Request) -> web.StreamResponse:
    """Sends the headers of an event stream: from here on, errors can only be events."""
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    return resp


async def end_sse_with_error(resp: web.StreamResponse, body: dict[str, Any]) -> None:
    """The error as the last event, then [DONE]; a client already gone is no error."""
    with contextlib.suppress(ConnectionError):
        await resp.write(sse_event(body))
        await resp.write(SSE_DONE)
