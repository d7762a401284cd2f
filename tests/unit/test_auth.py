"""`--api-key`: Bearer auth on every gateway route but /health (the real app, a fake bus)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.gateway.app import build_app
from services.gateway.state import GatewayState
from shared.config import ServerArgs
from shared.messages import GenerateRequest
from shared.subjects import Subjects
from tests.fakes import FakeBus

KEY = "s3cret-key"




@pytest.fixture
async def client() -> AsyncIterator[tuple[TestClient, FakeBus]]:
    bus = FakeBus()
    state = GatewayState(bus, Subjects(), ServerArgs(api_key=KEY, request_timeout=0.5))
    async with TestClient(TestServer(build_app(state))) as c:
        yield c, bus


def protected_routes() -> list[tuple[str, str]]:
    app = build_app(GatewayState(FakeBus(), Subjects(), ServerArgs(api_key=KEY)))
    routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method in ("GET", "POST")}
    return sorted(r for r in routes if r[1] != "/health")


def test_every_route_but_health_is_listed() -> None:
    paths = {p for _, p in protected_routes()}
    assert {"/generate", "/v1/completions", "/v1/chat/completions", "/metrics", "/openapi.json"} <= paths


@pytest.mark.parametrize(("method", "path"), protected_routes())
async def test_route_needs_the_key(client: tuple[TestClient, FakeBus], method: str, path: str) -> None:
    c, bus = client
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer"}):
        resp = await c.request(method, path, headers=headers, json={"text": "hi"})
        assert resp.status == 401, (path, headers)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        body = await resp.json()
        assert body["error"]["code"] == 401 and body["error"]["message"]
    assert bus.sent == []  # nothing reached the bus


async def test_health_is_open_and_the_key_opens_the_rest(client: tuple[TestClient, FakeBus]) -> None:
    c, bus = client
    resp = await c.get("/health")
    assert resp.status in (200, 503)  # no live rank in this test: 503, but not 401
    assert resp.status != 401
    resp = await c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status == 200 and (await resp.json())["object"] == "list"
    resp = await c.post("/generate", headers={"Authorization": f"bearer {KEY}"}, json={"text": "hi"})
    assert resp.status == 504  # authorized: published, then timed out with no scheduler behind
    assert any(isinstance(m, GenerateRequest) for _, m in bus.sent)


async def test_server_info_never_echoes_secrets() -> None:
    args = ServerArgs(api_key=KEY, nats_password="pw-123", nats_token="tok-456")
    state = GatewayState(FakeBus(), Subjects(), args)
    async with TestClient(TestServer(build_app(state))) as c:
        resp = await c.get("/get_server_info", headers={"Authorization": f"Bearer {KEY}"})
        text = await resp.text()
    assert resp.status == 200
    assert KEY not in text and "pw-123" not in text and "tok-456" not in text


def test_secrets_stay_off_the_command_line() -> None:
    args = ServerArgs(api_key=KEY, nats_user="u", nats_password="pw-123", nats_token="")
    argv = args.to_cli()
    assert KEY not in argv and "pw-123" not in argv and "--nats-user" in argv
    assert args.secret_env() == {"DPSERVE_API_KEY": KEY, "DPSERVE_NATS_PASSWORD": "pw-123"}
