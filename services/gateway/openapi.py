"""The OpenAPI 3 document of the gateway's HTTP API, served at `GET /openapi.json`.

Request bodies are derived from the msgspec Structs the handlers decode with
(`msgspec.json.schema_components`), so the document cannot drift from what the server accepts.
Every error answer has the same body, `ErrorBody`. tests/integration/test_fuzz_http.py checks
that the document names every route of the app, and fuzzes a live server from it.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from services.gateway.openai_protocol import ChatBody, CompletionBody
from services.gateway.protocol import GenerateBody, GenerateResponse
from services.gateway.replies import json_response
from services.gateway.sglang_routes import VERSION, AbortBody, DetokenizeBody, TokenizeBody

REF = "#/components/schemas/{name}"

ERROR_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "integer"},
            },
        }
    },
}
ANY_OBJECT: dict[str, Any] = {"type": "object"}

_ERRORS = {
    "400": "invalid request (the message says what to fix)",
    "401": "missing or wrong API key (with --api-key)",
    "404": "no such model",
    "413": "request body larger than 8 MiB",
    "429": "a DP rank's waiting queue is full; retry after Retry-After seconds",
    "503": "overloaded or no live rank; retry after Retry-After seconds",
    "504": "the request timed out",
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error_responses(*codes: str) -> dict[str, Any]:
    return {c: {"description": _ERRORS[c], "content": _json({"$ref": REF.format(name="ErrorBody")})} for c in codes}


def _get(summary: str, ok: dict[str, Any] | None = None, errors: tuple[str, ...] = ("401",)) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {"200": {"description": "OK", "content": ok or _json(ANY_OBJECT)}}
            | _error_responses(*errors),
        }
    }


def _post(summary: str, body: str | None, streams: bool, errors: tuple[str, ...]) -> dict[str, Any]:
    ok: dict[str, Any] = _json(
        {"$ref": REF.format(name="GenerateResponse")} if body == "GenerateBody" else ANY_OBJECT
    )
    if streams:
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": "OK (SSE when `stream` is true)" if streams else "OK", "content": ok}}
        | _error_responses(*errors),
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": _json({"$ref": REF.format(name=body)})}
    return {"post": op}


def _with_path_param(path: dict[str, Any], name: str) -> dict[str, Any]:
    for op in path.values():
        op["parameters"] = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}]
    return path


def build_openapi() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [GenerateBody, CompletionBody, ChatBody, AbortBody, TokenizeBody, DetokenizeBody, GenerateResponse],
        ref_template=REF,
    )
    components["ErrorBody"] = ERROR_BODY
    generation_errors = ("400", "401", "413", "429", "503", "504")
    tokenize_errors = ("400", "401", "413", "503")
    paths: dict[str, Any] = {
        "/generate": _post("SGLang's native generation", "GenerateBody", True, generation_errors),
        "/v1/completions": _post("OpenAI completions", "CompletionBody", True, generation_errors),
        "/v1/chat/completions": _post("OpenAI chat completions", "ChatBody", True, generation_errors),
        "/abort_request": _post("abort a request (by rid) or all of them", "AbortBody", False, ("400", "401")),
        "/flush_cache": _post("flush every rank's prefix cache when idle", None, False, ("401", "503"))
        | _get("the same as POST /flush_cache", errors=("401", "503")),
        "/health": _get("200 while a scheduler rank is live (no API key needed)", errors=("503",)),
        "/health_generate": _get("a one-token generation through the whole pipeline", errors=("401", "503")),
        "/v1/models": _get("the served model"),
        "/v1/models/{model}": _with_path_param(
            _get("the served model by its id; 404 for any other", errors=("401", "404")), "model"
        ),
        "/get_loads": _get("the dispatcher's load table", errors=("401", "503")),
        "/get_server_info": _get("server args and per-rank state"),
        "/server_info": _get("alias of /get_server_info"),
        "/get_model_info": _get("model path and name"),
        **{
            f"{prefix}/tokenize": _post("text -> token ids (SGLang's)", "TokenizeBody", False, tokenize_errors)
            for prefix in ("", "/v1")
        },
        **{
            f"{prefix}/detokenize": _post("token ids -> text (SGLang's)", "DetokenizeBody", False, tokenize_errors)
            for prefix in ("", "/v1")
        },
        "/metrics": _get("Prometheus metrics", ok={"text/plain": {"schema": {"type": "string"}}}),
        "/openapi.json": _get("this document"),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "dpserve", "version": VERSION},
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],  # open unless the server runs with --api-key
        "paths": paths,
    }


OPENAPI: dict[str, Any] = build_openapi()


def add_openapi_route(app: web.Application) -> None:
    async def openapi_json(request: web.Request) -> web.Response:
        return json_response(OPENAPI)

    app.router.add_get("/openapi.json", openapi_json)
