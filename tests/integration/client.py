"""A small HTTP client for the integration tests (stdlib only, so it exercises nothing of ours)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def post(url: str, body: Any, raw: bytes | None = None, timeout: float = 120) -> tuple[int, Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, timeout: float = 30) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def generate(base: str, timeout: float = 120, **body: Any) -> dict[str, Any]:
    status, out = post(base + "/generate", body, timeout=timeout)
    assert status == 200, out
    return dict(out)


def stream(base: str, timeout: float = 120, **body: Any) -> list[dict[str, Any]]:
    """The SSE events of a streamed /generate, up to and checking the final `[DONE]`."""
    req = urllib.request.Request(
        base + "/generate",
        data=json.dumps(body | {"stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    events: list[dict[str, Any]] = []
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        for line in resp:
            line = line.strip()
            if not line:
                continue
            assert line.startswith(b"data: "), line
            payload = line[len(b"data: ") :]
            if payload == b"[DONE]":
                return events
            events.append(json.loads(payload))
    raise AssertionError("stream ended without [DONE]")
