"""DP attention through `dpserve serve` (DeepSeek-V3 tiny, tp 2 dp 2, gloo): one group decodes
while the other runs idle batches (correct output, no hang); a burst keeps both groups busy;
and MLA's KV capacity: under the same per-rank byte budget, DP attention's total over the DP
groups is dp_size times plain TP's, because each group's latent cache is no longer a copy."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from services.scheduler.model.config import ModelConfig
from services.scheduler.model.mla_pool import kv_bytes_per_token
from tests.integration.client import generate, get
from tests.integration.tp_reference import make_models, reference, wait_ranks

DPA = ("--tp-size", "2", "--dp-size", "2", "--enable-dp-attention")
BUDGET = 480_000  # bytes of KV cache per rank
MAX_NEW = 24


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_models(tmp_path_factory.mktemp("dpa-models"))["deepseek_v3"]


@pytest.fixture(scope="module")
def refs(model: Path) -> list[tuple[list[int], list[int]]]:
    return reference(model, lengths=(5, 40), max_new=MAX_NEW)


@pytest.fixture(scope="module")
def dpa_server(server_factory, model: Path):  # noqa: ANN201
    server = server_factory("--model-path", str(model), "--kv-cache-bytes", str(BUDGET), *DPA)
    wait_ranks(server.url, 2)
    return server


def _states(url: str) -> list[dict]:
    status, info = get(url + "/get_server_info")
    assert status == 200
    return sorted(info["internal_states"], key=lambda s: s["dp_rank"])


def _sampling(max_new: int = MAX_NEW) -> dict:
    return {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True}


def test_one_group_decodes_while_the_other_idles(dpa_server, refs) -> None:
    (short, short_ref), (long, long_ref) = refs
    results: dict[str, dict] = {}

    def run(key: str, prompt: list[int], rank: int, max_new: int) -> None:
        results[key] = generate(
            dpa_server.url, input_ids=prompt, sampling_params=_sampling(max_new), routed_dp_rank=rank
        )

    # group 1 alone: group 0 runs idle batches for every one of its steps
    run("alone", long, 1, MAX_NEW)
    assert results["alone"]["output_ids"] == long_ref
    # both groups start together; group 0's short request ends and it idles while group 1 decodes
    threads = [
        threading.Thread(target=run, args=("long", long, 1, MAX_NEW)),
        threading.Thread(target=run, args=("short", short, 0, 2)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results["long"]["output_ids"] == long_ref
    assert results["short"]["output_ids"] == short_ref[:2]


def test_burst_keeps_both_groups_busy(dpa_server, refs) -> None:
    prompt, expected = refs[1]
    outs: list[list[int]] = []
    busy = {0: 0, 1: 0}

    def run() -> None:
        outs.append(generate(dpa_server.url, input_ids=prompt, sampling_params=_sampling())["output_ids"])

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for s in _states(dpa_server.url):
            busy[s["dp_rank"]] = max(busy[s["dp_rank"]], s["num_running_reqs"] + s["num_queue_reqs"])
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert outs == [expected] * 8  # batched with other rows, in either group: the same tokens
    assert busy[0] >= 1 and busy[1] >= 1, busy


def test_mla_kv_capacity_scales_with_dp_size(server_factory, dpa_server, model: Path) -> None:
    per_token = kv_bytes_per_token(ModelConfig.from_hf(model), torch.float32)
    dpa = _states(dpa_server.url)
    assert [s["dp_rank"] for s in dpa] == [0, 1]  # one entry per DP group
    tp = server_factory("--model-path", str(model), "--kv-cache-bytes", str(BUDGET), "--tp-size", "2")
    plain = _states(tp.url)
    tp.stop()
    assert len(plain) == 1
    per_rank = BUDGET // per_token
    assert plain[0]["max_total_num_tokens"] == per_rank
    assert [s["max_total_num_tokens"] for s in dpa] == [per_rank, per_rank]
    assert sum(s["max_total_num_tokens"] for s in dpa) == 2 * sum(s["max_total_num_tokens"] for s in plain)
    assert f"max_total_num_tokens={per_rank}" in dpa_server.log()


def test_structured_outputs_on_both_groups(dpa_server) -> None:
    """A grammar runs on every TP rank of a DP-attention group in lockstep (each rank masks and
    samples the same row): the constrained outputs of both groups validate."""
    import json

    from tests.structured import check_json, check_regex

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
              "tag": {"enum": ["x", "y"]}}, "required": ["ok", "n", "tag"]}
    for rank in (0, 1):
        out = generate(dpa_server.url, input_ids=[5, 6, 7], routed_dp_rank=rank, sampling_params={
            "temperature": 1.0, "seed": rank, "max_new_tokens": 80, "json_schema": json.dumps(schema)})
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        check_json(out["text"], schema)
        out = generate(dpa_server.url, input_ids=[8, 9], routed_dp_rank=rank, sampling_params={
            "temperature": 1.0, "seed": rank, "max_new_tokens": 40, "regex": "(ab|cd)-[0-9]{2,4}"})
        check_regex(out["text"], "(ab|cd)-[0-9]{2,4}")
