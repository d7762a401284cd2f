"""`--api-key`: every gateway route but the open ones needs `Authorization: Bearer <key>`.

A missing or wrong key is answered 401 with a JSON error body and `WWW-Authenticate: Bearer`.
The key is compared in constant time. `/health` stays open so that load balancers and container
health checks need no secret.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from services.gateway.replies import Handler, json_error

OPEN_PATHS = frozenset({"/health"})

Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def bearer_token(request: web.Request) -> str | None:
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def api_key_middleware(api_key: str) -> Middleware:
    expected = api_key.encode()

    @web.middleware
    async def require_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        token = bearer_token(request)
        if token is None:
            return unauthorized("missing API key: send `Authorization: Bearer <key>`")
        if not hmac.compare_digest(token.encode(), expected):
            return unauthorized("invalid API key")
        return await handler(request)

    return require_api_key


def unauthorized(message: str) -> web.Response:
    return json_error(message, 401, {"WWW-Authenticate": 'Bearer realm="dpserve"'})
