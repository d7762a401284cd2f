"""The OpenAI API and SGLang's endpoints on a real `dpserve serve`, driven by the official client."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import openai
import pytest
from tokenizers import Tokenizer

from tests.integration.client import generate, get, post


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., Any]) -> Any:
    return server_factory("--dp-size", "2")


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_and_completion_match_generate(client: openai.OpenAI, server: Any) -> None:
    (model,) = client.models.list().data
    out = client.completions.create(model=model.id, prompt="Once upon a time", max_tokens=8, temperature=0)
    ref = generate(server.url, text="Once upon a time", sampling_params={"max_new_tokens": 8, "temperature": 0})
    assert out.choices[0].text == ref["text"]
    assert out.usage is not None
    assert out.usage.completion_tokens == ref["meta_info"]["completion_tokens"]
    assert out.usage.prompt_tokens == ref["meta_info"]["prompt_tokens"]
    assert out.choices[0].finish_reason in ("stop", "length")


def test_echo_logprobs_score_a_prompt_like_an_eval_harness(client: openai.OpenAI, server: Any, tiny_model: Any) -> None:
    """lm-eval's loglikelihood call (echo + logprobs + max_tokens 0): the prompt's token logprobs,
    the same numbers /generate gives with logprob_start_len 0, and nothing generated."""
    text = "The quick brown fox jumps"
    scored = client.completions.create(model="x", prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0)
    (choice,) = scored.choices
    ref = generate(server.url, text=text, sampling_params={"max_new_tokens": 1, "temperature": 0},
                   return_logprob=True, logprob_start_len=0)["meta_info"]["input_token_logprobs"]
    assert choice.text == text and choice.logprobs is not None
    assert choice.logprobs.token_logprobs is not None and choice.logprobs.tokens is not None
    assert len(choice.logprobs.tokens) == len(ref) and "".join(choice.logprobs.tokens) == text
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx([lp for lp, _, _ in ref[1:]], abs=1e-5)
    assert scored.usage is not None and scored.usage.completion_tokens == 0
    # a prompt of token ids comes back as its text
    ids = Tokenizer.from_file(str(tiny_model / "tokenizer.json")).encode(text).ids
    echoed = client.completions.create(model="x", prompt=ids, max_tokens=2, echo=True, temperature=0)
    assert echoed.choices[0].text.startswith(text) and len(echoed.choices[0].text) > len(text)


def test_completion_n_and_seed_are_reproducible(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": "x", "prompt": "abc", "max_tokens": 6, "n": 3, "seed": 11, "temperature": 1.0}
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # seed + index: distinct choices
    assert a.usage is not None and a.usage.completion_tokens >= 3


def test_chat_stream_equals_whole(client: openai.OpenAI, tiny_model: Any) -> None:
    messages: Any = [{"role": "system", "content": "short"}, {"role": "user", "content": "Tell me a story"}]
    whole = client.chat.completions.create(model="x", messages=messages, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="x", messages=messages, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # the chat template was applied: the prompt is longer than the bare message texts
    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    bare = len(tok.encode("short").ids) + len(tok.encode("Tell me a story").ids)
    assert whole.usage.prompt_tokens > bare


def test_logprobs_match_generate(client: openai.OpenAI, server: Any, tiny_model: Any) -> None:
    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    messages: Any = [{"role": "user", "content": "Count to three"}]
    chat = client.chat.completions.create(
        model="x", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    assert chat.usage is not None and chat.choices[0].logprobs is not None
    content = chat.choices[0].logprobs.content or []
    assert len(content) == chat.usage.completion_tokens
    # legacy completions: the same greedy request on /generate gives the same logprobs
    done = client.completions.create(model="x", prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=3)
    ref = generate(
        server.url, text="Once upon a time", sampling_params={"max_new_tokens": 6, "temperature": 0},
        return_logprob=True, top_logprobs_num=3,
    )
    ref_lps = ref["meta_info"]["output_token_logprobs"]
    lp = done.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.tokens is not None and lp.top_logprobs is not None
    assert len(lp.token_logprobs) == len(ref_lps) == len(ref["output_ids"])
    for got, (want, _, _) in zip(lp.token_logprobs, ref_lps, strict=True):
        assert abs(got - want) < 1e-4
    assert lp.tokens == [tok.decode([i], skip_special_tokens=False) for i in ref["output_ids"]]
    for token, row in zip(lp.tokens, lp.top_logprobs, strict=True):
        assert len(row) == 3 and max(row, key=row.__getitem__) == token  # greedy: the chosen is the best
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert bytes(entry.bytes or []).decode("utf-8", errors="replace") == entry.token
    # streamed: the chunks' entries together equal the whole response's
    chunks = list(client.chat.completions.create(
        model="x", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True
    ))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert [e.token for e in streamed] == [e.token for e in content]
    # (a prefix-cache hit can change the float rounding, not the result)
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(streamed, content, strict=True))


def test_stop_string_ends_the_text(client: openai.OpenAI) -> None:
    free = client.completions.create(model="x", prompt="The", max_tokens=24, temperature=0)
    text = free.choices[0].text
    if len(text) < 4:
        pytest.fail(f"the tiny model produced too little text to test stop: {text!r}")
    stop = text[2:4]
    cut = client.completions.create(model="x", prompt="The", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_errors_are_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="x", prompt="a", max_tokens=1, logprobs=21)
    assert "logprobs must be between 0 and 20" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="x", prompt="a " * 5000, max_tokens=10)
    assert "context length" in str(e.value)


def test_sglang_endpoints(server: Any) -> None:
    deadline = time.monotonic() + 60  # /health answers once one rank is live; wait for both
    while True:
        status, info = get(server.url + "/get_server_info")
        assert status == 200 and info["dp_size"] == 2
        states = info["internal_states"]
        if len(states) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [s["dp_rank"] for s in states] == [0, 1]
    assert all(s["max_total_num_tokens"] > 0 for s in states)
    status, health = get(server.url + "/health_generate")
    assert status == 200 and len(health["output_ids"]) == 1
    assert post(server.url + "/flush_cache", {})[0] == 200
    status, body = post(server.url + "/abort_request", {"rid": "nothing-running"})
    assert status == 200 and body["aborted"] == ["nothing-running"]
    assert get(server.url + "/get_model_info")[1]["is_generation"] is True


def test_metrics_gather_every_service(server: Any) -> None:
    import urllib.request

    for i in range(4):
        generate(server.url, text=f"metrics {i}", sampling_params={"max_new_tokens": 4, "ignore_eos": True})
    deadline = time.monotonic() + 10  # snapshots arrive every second

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
            lines = resp.read().decode().splitlines()
        out: dict[str, float] = {}
        for line in lines:
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    while True:
        m = scrape()
        decisions = sum(v for k, v in m.items() if k.startswith("dpserve:dispatcher_decisions_total"))
        tokenized = sum(v for k, v in m.items() if k.startswith("dpserve:tokenizer_requests_total"))
        if (decisions >= 4 and tokenized >= 4) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert decisions >= 4 and tokenized >= 4
    gen = sum(v for k, v in m.items() if k.startswith("dpserve:generation_tokens_total"))
    assert gen >= 16
    assert {'dpserve:max_total_num_tokens{dp_rank="0"}', 'dpserve:max_total_num_tokens{dp_rank="1"}'} <= set(m)
    ttft = [v for k, v in m.items() if k.startswith("dpserve:time_to_first_token_seconds_count")]
    assert ttft and ttft[0] >= 4
    assert any(k.startswith("dpserve:dispatcher_rank_live") and v == 1 for k, v in m.items())
