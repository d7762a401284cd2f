"""Prefill/decode disaggregation through `dpserve serve`: the same requests give transformers'
greedy output (the reference every colocated layout reproduces) when prefill ranks compute the
long prompts and decode ranks install their KV, for tiny Llama (one rank a side) and for tiny
DeepSeek-V3 with DP attention on the decode side (MLA's latent rows shipped once per group).
The metrics say which prompts went where and how many bytes moved."""

from __future__ import annotations

import re
import threading
import urllib.request
from pathlib import Path

import pytest

from services.scheduler.model.config import ModelConfig
from tests.integration.client import generate
from tests.integration.tp_reference import make_models, reference, wait_ranks

LENGTHS = (5, 300, 301, 700)  # the shortest is prefilled on its decode rank, the others on a prefill rank
THRESHOLD = ("--disaggregation-min-prompt-tokens", "64")
MAX_NEW = 12


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def run_all(url: str, refs: list[tuple[list[int], list[int]]], **extra: object) -> list[dict]:
    """Every prompt at once (they overlap on the ranks), greedy."""
    outs: list[dict] = [{} for _ in refs]

    def one(i: int) -> None:
        outs[i] = generate(url, input_ids=refs[i][0], timeout=180, return_logprob=True,
                           sampling_params={"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}, **extra)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(refs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    return outs


def wait_metric(url: str, name: str, at_least: float, **labels: str) -> float:
    """Metrics arrive in snapshots every second: polls until the value reaches `at_least`."""
    import time

    deadline = time.monotonic() + 10
    while (value := metric(url, name, **labels)) < at_least and time.monotonic() < deadline:
        time.sleep(0.25)
    return value


def test_tiny_llama_disaggregated_equals_colocated_and_transformers(server_factory, tiny_model: Path) -> None:
    refs = reference(tiny_model, lengths=LENGTHS, max_new=MAX_NEW)
    colocated = server_factory("--dp-size", "2")
    together = run_all(colocated.url, refs)
    colocated.stop()
    server = server_factory("--prefill-dp-size", "1", "--decode-dp-size", "1", *THRESHOLD)
    wait_ranks(server.url, 2)
    apart = run_all(server.url, refs)
    for (prompt, want), a, b in zip(refs, together, apart, strict=True):
        assert a["output_ids"] == want, len(prompt)
        assert b["output_ids"] == want, len(prompt)
        lp_a = [round(lp, 3) for lp, _, _ in a["meta_info"]["output_token_logprobs"]]
        lp_b = [round(lp, 3) for lp, _, _ in b["meta_info"]["output_token_logprobs"]]
        assert lp_a == pytest.approx(lp_b, abs=2e-3)
    remote = wait_metric(server.url, "dpserve:prefill_requests_total", 3, mode="decode", where="remote")
    assert remote == 3  # the three long prompts (the first two share nothing: no decode-side cache)
    assert metric(server.url, "dpserve:prefill_requests_total", mode="decode", where="local") == 1
    config = ModelConfig.from_hf(tiny_model)
    row = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 4  # float32 K and V
    shipped = wait_metric(server.url, "dpserve:kv_transfer_bytes_total", 1, mode="prefill")
    assert shipped == (300 + 301 + 700) * row
    assert metric(server.url, "dpserve:kv_transfer_failures_total") == 0
    assert metric(server.url, "dpserve:time_to_first_token_seconds_count", prefill="remote") == 3
    assert metric(server.url, "dpserve:time_to_first_token_seconds_count", prefill="local") == 1
    # the same long prompt again: the decode rank has it cached now and prefills the one token left itself
    again = generate(server.url, input_ids=refs[3][0], sampling_params={"temperature": 0, "max_new_tokens": MAX_NEW,
                                                                         "ignore_eos": True})
    assert again["output_ids"] == refs[3][1]
    assert again["meta_info"]["cached_tokens"] == 699
    assert wait_metric(server.url, "dpserve:prefill_requests_total", 2, mode="decode", where="local") == 2


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_models(tmp_path_factory.mktemp("pd-models"))["deepseek_v3"]


def test_tiny_deepseek_v3_with_dp_attention_on_the_decode_side(server_factory, deepseek: Path) -> None:
    refs = reference(deepseek, lengths=(5, 300, 300), max_new=MAX_NEW)
    server = server_factory(
        "--model-path", str(deepseek), "--prefill-dp-size", "1", "--decode-dp-size", "2", "--decode-tp-size", "2",
        "--decode-enable-dp-attention", *THRESHOLD,
    )
    wait_ranks(server.url, 3)
    outs = run_all(server.url, refs)
    assert [o["output_ids"] for o in outs] == [want for _, want in refs]
    for decode_rank in (0, 1):  # each DP group installs rows of its own requests
        out = generate(server.url, input_ids=refs[1][0][:-1] + [7], routed_dp_rank=decode_rank,
                       sampling_params={"temperature": 0, "max_new_tokens": 4, "ignore_eos": True})
        assert len(out["output_ids"]) == 4
    assert wait_metric(server.url, "dpserve:prefill_requests_total", 4, mode="decode", where="remote") >= 2
    config = ModelConfig.from_hf(deepseek)
    assert config.mla is not None
    row = config.num_hidden_layers * config.mla.kv_cache_dim * 4  # one latent row per layer, float32
    shipped = metric(server.url, "dpserve:kv_transfer_bytes_total", mode="prefill")
    assert shipped > 0 and shipped % row == 0
    assert metric(server.url, "dpserve:kv_transfer_failures_total") == 0
