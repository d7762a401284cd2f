"""OpenAI / SGLang compatibility routes on a real `dpserve serve` of the tiny model: /tokenize and
/detokenize through the tokenizer service, CORS, /v1/models/{id}, chat without max_tokens (up to
the rest of the context), logit_bias, and the official client sending OpenAI's extra fields."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from services.tokenizer.tokenize import TextTokenizer
from tests.integration.client import get, post

CONTEXT = 96  # short, so a chat without max_tokens ends quickly on CPU


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., Any]) -> Any:
    return server_factory("--context-length", str(CONTEXT), "--served-model-name", "org/tiny")


def test_tokenize_and_detokenize(server: Any, tiny_model: Path) -> None:
    tok = TextTokenizer(str(tiny_model), CONTEXT)
    status, body = post(server.url + "/tokenize", {"prompt": "hello world"})
    assert status == 200, body
    assert body == {"tokens": tok.encode("hello world"), "count": len(body["tokens"]), "max_model_len": CONTEXT}
    status, text = post(server.url + "/v1/detokenize", {"tokens": [body["tokens"]]})
    assert status == 200 and text == {"text": [tok.decode(body["tokens"])]}
    status, err = post(server.url + "/detokenize", {"tokens": [10**9]})
    assert status == 400 and err["error"]["param"] == "tokens"


def test_cors_and_model_by_id(server: Any) -> None:
    preflight = urllib.request.Request(
        server.url + "/v1/chat/completions",
        method="OPTIONS",
        headers={"Origin": "http://page.example", "Access-Control-Request-Method": "POST"},
    )
    with urllib.request.urlopen(preflight, timeout=10) as resp:
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "*"
    with urllib.request.urlopen(server.url + "/v1/models/org/tiny", timeout=10) as resp:
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "*"
    status, err = get(server.url + "/v1/models/other")
    assert status == 404 and err["error"]["code"] == 404


def test_chat_without_max_tokens_may_use_the_rest_of_the_context(server: Any) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "ignore_eos": True}
    status, out = post(server.url + "/v1/chat/completions", body)
    assert status == 200, out
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["total_tokens"] == CONTEXT  # not the 128 a /generate default would ask


def test_logit_bias_forces_a_token(server: Any, tiny_model: Path) -> None:
    tok = TextTokenizer(str(tiny_model), CONTEXT)
    (t,) = tok.tokenizer.encode("a", add_special_tokens=False).ids
    body = {"prompt": "hello", "max_tokens": 3, "temperature": 0, "logit_bias": {str(t): 100}}
    status, out = post(server.url + "/v1/completions", body)
    assert status == 200, out
    assert out["choices"][0]["text"] == tok.decode([t, t, t])


def test_openai_client_with_extra_fields(server: Any) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.chat.completions.create(
        model="org/tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        user="u-1",
        store=False,
        metadata={"team": "a"},
        service_tier="auto",
        seed=1,
        parallel_tool_calls=False,
        tool_choice="none",
        response_format={"type": "text"},
        extra_body={"some_future_field": 1, "top_k": None},
    )
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage is not None and out.usage.completion_tokens <= 4
