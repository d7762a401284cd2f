"""Bad input over HTTP: the OpenAPI document, a schemathesis run against a live `dpserve serve`,
oversize bodies (413) and prompts longer than the context (400)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from services.gateway.app import build_app
from services.gateway.state import GatewayState
from shared.config import ServerArgs
from shared.subjects import Subjects
from tests.integration.client import generate, get, post

CONTEXT = 48  # small, so generated requests stay short
MIN_CASES = 500


@pytest.fixture(scope="module")
def server(server_factory: Any) -> Any:
    return server_factory("--context-length", str(CONTEXT), "--request-timeout", "60")


class _NoBus:
    async def publish(self, subject: str, msg: Any) -> None: ...


def test_openapi_documents_every_route(server: Any) -> None:
    status, doc = get(server.url + "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    app = build_app(GatewayState(_NoBus(), Subjects(), ServerArgs()))
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == routes
    # request bodies come from the msgspec Structs: what the server accepts and refuses is there
    schemas = doc["components"]["schemas"]
    sampling = schemas["GenerateSamplingParams"]
    assert "max_new_tokens" in sampling["properties"]
    assert sampling.get("additionalProperties") is False  # an unknown sampling parameter is a 400
    generate = schemas["GenerateBody"]
    assert "additionalProperties" not in generate  # unknown top-level fields are ignored, as SGLang does
    assert {"type": "array", "items": {"type": "string"}} in generate["properties"]["text"]["anyOf"]  # a batch


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(server: Any, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    argv = [
        str(Path(sys.executable).parent / "schemathesis"), "run", server.url + "/openapi.json",
        "--checks", "not_a_server_error", "--max-examples", "100", "--seed", "7", "--workers", "2",
        "--request-timeout", "60", "--no-color", "--generation-database", "none",
        "--report", "json", "--report-json-path", str(report),
    ]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    cases = int(re.search(r"(\d+) generated", out).group(1))  # type: ignore[union-attr]
    assert cases >= MIN_CASES, out[-3000:]
    # still serving, nothing crashed
    assert server.proc.poll() is None
    assert generate(server.url, text="after the fuzz", sampling_params={"max_new_tokens": 4, "temperature": 0})[
        "meta_info"]["completion_tokens"] == 4
    log = server.log()
    assert "handler failed" not in log and "tokenization failed" not in log and "forward failed" not in log
    assert "exited code" not in log  # the launcher restarted nothing


BIG = b'{"text": "' + b"a" * (9 * 1024 * 1024) + b'"}'


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_oversize_body_is_413(server: Any, path: str) -> None:
    status, out = post(server.url + path, None, raw=BIG)
    assert status == 413, out
    assert "larger than" in out["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {"input_ids": [5] * (CONTEXT + 1), "sampling_params": {"max_new_tokens": 1}}),
        ("/generate", {"text": "word " * 400, "sampling_params": {"max_new_tokens": 1}}),
        ("/v1/completions", {"prompt": "word " * 400, "max_tokens": 1}),
        ("/v1/completions", {"prompt": [5] * (CONTEXT + 1), "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 1}),
    ],
)
def test_prompt_longer_than_context_is_400(server: Any, path: str, body: dict[str, Any]) -> None:
    status, out = post(server.url + path, body)
    assert status == 400, out
    assert "context length" in out["error"]["message"], out
    json.dumps(out)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {"input_ids": [1, 10**30]}),
        ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 10**25}}),
        ("/generate", {"text": "hi", "sampling_params": {"seed": -1}}),
        ("/generate", {"text": "hi", "sampling_params": {"temperature": 1e400}}),
        ("/generate", {"text": "hi", "sampling_params": {"stop_token_ids": [10**9], "min_new_tokens": 1,
                                                         "max_new_tokens": 2}}),
        ("/v1/completions", {"prompt": [[1, 10**22]], "max_tokens": 1}),
    ],
)
def test_out_of_range_numbers_are_400(server: Any, path: str, body: dict[str, Any]) -> None:
    status, out = post(server.url + path, body)
    assert status == 400, out
    assert out["error"]["message"]


def test_tiny_temperature_is_greedy(server: Any) -> None:
    a = generate(server.url, text="hello", sampling_params={"max_new_tokens": 6, "temperature": 1e-300})
    b = generate(server.url, text="hello", sampling_params={"max_new_tokens": 6, "temperature": 0})
    assert a["output_ids"] == b["output_ids"]
