"""SGLang-shaped `/generate` bodies against a real `dpserve serve` (tiny model): nulls, a plain
string stop, batches of texts and of input_ids, n, a streamed batch, the fields the SGLang Model
Gateway forwards, return_text_in_logprobs."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest

from tests.integration.client import generate, post, stream


@pytest.fixture(scope="module")
def server(server_factory: Any) -> Any:
    return server_factory("--request-timeout", "60")


GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


def alone(server: Any, **body: Any) -> dict[str, Any]:
    return generate(server.url, sampling_params=GREEDY, **body)


def test_nulls_and_a_plain_string_stop(server: Any) -> None:
    base = alone(server, text="The city of")
    nulls = {"rid": None, "stream": None, "lora_path": None, "return_logprob": None, "image_data": None}
    out = generate(server.url, text="The city of", sampling_params=GREEDY | {"top_p": None, "regex": None}, **nulls)
    assert out["text"] == base["text"]
    text = base["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    cut = generate(server.url, text="The city of", sampling_params=GREEDY | {"stop": stop})
    assert cut["text"] == text[: text.index(stop)]
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


def test_a_batch_of_texts_and_of_input_ids_match_single_requests(server: Any) -> None:
    texts = ["Once upon a time", "hello"]
    singles = [alone(server, text=t) for t in texts]
    status, batch = post(server.url + "/generate", {"text": texts, "sampling_params": GREEDY, "rid": "bt"})
    assert status == 200, batch
    assert [b["text"] for b in batch] == [s["text"] for s in singles]
    assert [b["meta_info"]["id"] for b in batch] == ["bt_0", "bt_1"]

    ids = [[5, 6, 7, 8], [9, 10]]
    params = [GREEDY, GREEDY | {"max_new_tokens": 3}]
    status, batch = post(server.url + "/generate", {"input_ids": ids, "sampling_params": params})
    assert status == 200, batch
    assert [b["output_ids"] for b in batch] == [
        alone(server, input_ids=ids[0])["output_ids"],
        generate(server.url, input_ids=ids[1], sampling_params=params[1])["output_ids"],
    ]


def test_n_samples_each_prompt_consecutively(server: Any) -> None:
    body = {"text": ["a b c", "x y"], "sampling_params": GREEDY | {"n": 2}, "rid": "n"}
    status, out = post(server.url + "/generate", body)
    assert status == 200, out
    assert [o["meta_info"]["id"] for o in out] == ["n_0", "n_1", "n_2", "n_3"]
    # greedy: item i's two samples are the same, and each is the prompt's single answer
    assert out[0]["text"] == out[1]["text"] == alone(server, text="a b c")["text"]
    assert out[2]["text"] == out[3]["text"] == alone(server, text="x y")["text"]


def test_a_streamed_batch_is_tagged_by_index(server: Any) -> None:
    texts = ["Once upon a time", "hello"]
    events = stream(server.url, text=texts, sampling_params=GREEDY)
    finals = {e["index"]: e for e in events if e["meta_info"]["finish_reason"] is not None}
    assert sorted(finals) == [0, 1] and all("index" in e for e in events)
    assert [finals[i]["text"] for i in (0, 1)] == [alone(server, text=t)["text"] for t in texts]


def test_fields_the_model_gateway_forwards(server: Any) -> None:
    body = {
        "text": "hello", "model": "unknown", "sampling_params": GREEDY, "stream": False,
        "return_logprob": True, "top_logprobs_num": 2, "return_text_in_logprobs": True,
        "log_metrics": True, "return_hidden_states": False, "background": False, "no_logs": False,
        "return_bytes": False, "return_entropy": False, "data_parallel_rank": 0,
        "some_new_sglang_field": {"x": 1},
    }
    status, out = post(server.url + "/generate", body)
    assert status == 200, out
    entries = out["meta_info"]["output_token_logprobs"]
    assert len(entries) == 8 and all(isinstance(t, str) for _, _, t in entries)
    assert "".join(t for _, _, t in entries) == out["text"]  # ASCII output: every token spells itself
    assert all(len(row) == 2 and isinstance(row[0][2], str) for row in out["meta_info"]["output_top_logprobs"])
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as resp:
        metrics = resp.read().decode()
    assert 'dpserve:ignored_request_fields_total{field="some_new_sglang_field"' in metrics

    status, out = post(server.url + "/generate", {"text": "hi", "sampling_params": {"json_schema": '{"type": "objec'}})
    assert status == 400 and out["error"]["message"].startswith("invalid json_schema: "), out


def test_logit_bias_with_sglang_string_keys(server: Any) -> None:
    base = alone(server, text="hello")
    first = base["output_ids"][0]
    out = generate(server.url, text="hello", sampling_params=GREEDY | {"logit_bias": {str(first): -100}})
    assert out["output_ids"][0] != first
