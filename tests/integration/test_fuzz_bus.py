"""Bad input on the bus: >= 10,000 random, truncated, wrong-type and bad-value msgpack messages on
every subject while requests run. Every service stays up, the running requests finish with the
same greedy output as alone, each drop is logged, and the KV pool goes back to idle.

Forged ranks too: well-formed LoadReports and RankHellos of a new instance for the live ranks (and
for a rank past dp_size) are ignored or refused by the dispatcher's rank registry and the gateway's
liveness view; the real ranks keep serving with the same instance ids. Out of scope: a client that
reuses a live instance's id (NATS auth, tests/integration/test_security.py, keeps such clients off).
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import nats
import pytest

from shared.messages import (
    Abort,
    FinishReason,
    GenerateRequest,
    LoadReport,
    PrefillDone,
    PrefillTask,
    RankAssignment,
    RankHello,
    RequestError,
    SamplingParams,
    TextBatch,
    TextOutput,
    TokenBatch,
    TokenizedRequest,
    TokenOutput,
)
from shared.subjects import Subjects
from tests.integration.client import generate, get, post
from tests.integration.test_disaggregation import metric, wait_metric

N_MESSAGES = 10_000
FORGER = "f0rged00"
GREEDY = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(server_factory: Any, nats_url: str) -> Any:
    return server_factory("--nats-url", nats_url, "--dp-size", "2")


def valid_messages(gateway_id: str) -> list[msgspec.Struct]:
    out = TokenOutput(rid="ghost", gateway_id=gateway_id, seq=0, ids=[1], num_new=1, prompt_tokens=1,
                      completion_tokens=1)
    return [
        GenerateRequest(rid="f", gateway_id="nobody", text="hi"),
        TokenizedRequest(rid="f", gateway_id="nobody", input_ids=[1, 2]),
        TokenBatch(dp_rank=0, outputs=[out]),
        TextBatch(outputs=[TextOutput(rid="ghost", seq=0, text="x", new_ids=[1], prompt_tokens=1,
                                      completion_tokens=1, finish=FinishReason(type="stop"))]),
        LoadReport(dp_rank=0, seq=1, timestamp=0.0, holding_tokens=1, num_running=1, num_waiting=0,
                   kv_used=1, kv_total=10),  # no instance id: nonsense
        *forged_ranks(),
        RankHello(instance_id="x"),
        Abort(rid="ghost"),
    ]


def forged_ranks() -> list[msgspec.Struct]:
    """Well-formed claims of a new instance on the live ranks and on ranks past dp_size."""
    return [
        *(LoadReport(dp_rank=k, seq=2**40, timestamp=1.0, holding_tokens=0, num_running=0, num_waiting=0,
                     kv_used=0, kv_total=10, accepted=[1, 2, 3], finished=[1], instance_id=FORGER) for k in (0, 1, 2, 999)),
        *(RankHello(instance_id=FORGER, requested_dp_rank=k) for k in (0, 1, 999)),
    ]


def bad_values(gateway_id: str) -> list[msgspec.Struct]:
    """Well-typed messages with nonsense in them: each must be refused or ignored, never crash."""
    nan = math.nan
    return [
        TokenizedRequest(rid="b1", gateway_id=gateway_id, input_ids=[-5, 2**40]),
        TokenizedRequest(rid="b2", gateway_id=gateway_id, input_ids=[1] * 10, dispatch_id=2**62,
                         sampling=SamplingParams(max_new_tokens=-3)),
        TokenizedRequest(rid="b3", gateway_id=gateway_id, input_ids=[1, 2],
                         sampling=SamplingParams(temperature=nan, max_new_tokens=2)),
        TokenizedRequest(rid="b4", gateway_id=gateway_id, input_ids=[1, 2],
                         sampling=SamplingParams(stop_token_ids=[10**12], min_new_tokens=1, max_new_tokens=2)),
        TokenizedRequest(rid="b5", gateway_id=gateway_id, input_ids=[], top_logprobs_num=-7),
        TokenizedRequest(rid="b6", gateway_id=gateway_id, input_ids=[1], routed_dp_rank=99),
        GenerateRequest(rid="b7", gateway_id=gateway_id, input_ids=[2**60], sampling=SamplingParams(top_p=nan)),
        LoadReport(dp_rank=57, seq=1, timestamp=0.0, holding_tokens=0, num_running=0, num_waiting=0,
                   kv_used=0, kv_total=1, instance_id="x"),
        LoadReport(dp_rank=0, seq=-1, timestamp=nan, holding_tokens=-10, num_running=-1, num_waiting=0,
                   kv_used=9, kv_total=1, instance_id="y", cache_hit_rate=nan),
        LoadReport(dp_rank=-1, seq=2**62, timestamp=1.0, holding_tokens=0, num_running=0, num_waiting=0,
                   kv_used=0, kv_total=0),
        TokenBatch(dp_rank=-4, outputs=[TokenOutput(rid="ghost", gateway_id=gateway_id, seq=-1, ids=[-1, 2**50],
                                                    num_new=99, prompt_tokens=-1, completion_tokens=-1)]),
        TextBatch(outputs=[RequestError(rid="ghost", message="forged", status=999)]),
        Abort(rid="", dp_rank=-3),
        *forged_ranks(),
    ]


def garbage(rng: random.Random, valid: list[bytes]) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 64))
    if kind == 1:  # a valid message cut short
        v = rng.choice(valid)
        return v[: rng.randrange(0, max(1, len(v)))]
    if kind == 2:  # a valid message with bytes flipped
        v = bytearray(rng.choice(valid))
        for _ in range(rng.randrange(1, 4)):
            v[rng.randrange(len(v))] = rng.randrange(256)
        return bytes(v)
    if kind == 3:  # valid msgpack of arbitrary shape
        return msgspec.msgpack.encode(rng.choice([None, 5, -1, "x", [1, 2], {"rid": 5}, {"dp_rank": "a"}, 1.5]))
    return rng.choice(valid)  # valid msgpack of (usually) the wrong type for the subject


async def flood(nats_url: str, subjects: list[str], gateway_id: str, more_valid: list[msgspec.Struct] | None = None,
                more_nonsense: list[msgspec.Struct] | None = None) -> int:
    rng = random.Random(1234)
    valid = [msgspec.msgpack.encode(m) for m in [*valid_messages(gateway_id), *(more_valid or [])]]
    nonsense = [msgspec.msgpack.encode(m) for m in [*bad_values(gateway_id), *(more_nonsense or [])]]
    nc = await nats.connect(nats_url)
    sent = 0
    for subject in subjects:  # every bad-value message on every subject
        for payload in nonsense:
            await nc.publish(subject, payload)
            sent += 1
    while sent < N_MESSAGES:
        for subject in subjects:
            await nc.publish(subject, garbage(rng, valid))
            sent += 1
        if sent % 500 < len(subjects):
            await nc.flush()
            await asyncio.sleep(0.02)  # let the services breathe; the flood still overlaps the requests
    # request/reply subjects get requests too (a reply must not be required to survive)
    for subject in subjects[-3:]:
        try:
            await nc.request(subject, b"\x93\x01", timeout=0.2)
        except Exception:
            pass
    await nc.flush()
    await nc.close()
    return sent


def live_instances(url: str, timeout: float = 60) -> dict[int, str]:
    """dp_rank -> instance id, once both ranks are live."""
    deadline = time.monotonic() + timeout
    while True:
        ranks = get(url + "/get_loads")[1]["ranks"]
        if sorted(r["dp_rank"] for r in ranks if r["status"] == "live") == [0, 1]:
            return {r["dp_rank"]: r["instance_id"] for r in ranks}
        assert time.monotonic() < deadline, ranks
        time.sleep(0.2)


@pytest.mark.slow
async def test_bus_fuzz_loses_nothing(server: Any, nats_url: str) -> None:
    gateway_id = re.search(r"gateway_id=(\w+)", server.log()).group(1)  # type: ignore[union-attr]
    prompts = [f"fuzz prompt number {i}" for i in range(6)]
    solo = [generate(server.url, text=p, sampling_params=GREEDY)["output_ids"] for p in prompts]

    s = Subjects("dpserve")
    instances = live_instances(server.url)
    assert FORGER not in instances.values()
    subjects = [s.tokenize, s.dispatch, s.sched_req(0), s.sched_req(1), s.sched_req(7), s.sched_control,
                s.load(0), s.load(1), s.load(9), s.detok, s.out(gateway_id), s.metrics,
                s.rank_register, s.dispatcher_loads]
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(len(prompts)) as pool:
        running = [loop.run_in_executor(pool, lambda p=p: generate(server.url, text=p, sampling_params=GREEDY))
                   for p in prompts]
        sent = await flood(nats_url, subjects, gateway_id)
        results = await asyncio.gather(*running)
    assert sent >= N_MESSAGES
    assert [r["output_ids"] for r in results] == solo  # nothing in flight was lost or corrupted
    nc = await nats.connect(nats_url)  # a forged hello for a live rank is refused with a message
    for k in (0, 1):
        reply = await nc.request(s.rank_register, msgspec.msgpack.encode(RankHello(instance_id=FORGER,
                                                                                   requested_dp_rank=k)), timeout=5)
        answer = msgspec.msgpack.decode(reply.data, type=RankAssignment)
        assert answer.dp_rank is None and "held by live instance" in answer.message, answer
    await nc.close()

    time.sleep(1.0)
    assert server.proc.poll() is None
    log = server.log()
    assert "exited code" not in log  # the launcher restarted no service
    drops = [line for line in log.splitlines() if "dropped undecodable message" in line]
    for service in ("tokenizer", "dispatcher", "scheduler", "detokenizer", "gateway"):
        assert any(service in line for line in drops), service
    assert len(drops) >= 100  # every subscription logged its first drops ...
    assert len(drops) < sent  # ... and the log is rate-limited
    assert "dropped nonsense load report" in log
    assert "forward failed" not in log
    assert "handler failed" not in log  # an answer to a gateway id that makes no subject is dropped and logged

    # every service still works end to end, and the KV pools are back to idle
    out = generate(server.url, text=prompts[0], sampling_params=GREEDY)
    assert out["output_ids"] == solo[0]
    deadline = time.monotonic() + 10
    while True:
        status, loads = get(server.url + "/get_loads")
        assert status == 200
        ranks = loads["ranks"]
        if len(ranks) == 2 and all(r["kv_used"] == 0 and r["num_running"] == 0 for r in ranks):
            break
        assert time.monotonic() < deadline, loads
        time.sleep(0.2)
    assert sorted(r["dp_rank"] for r in ranks) == [0, 1]  # no forged rank joined the table
    # the real ranks kept their ranks: same instances, live, never restarted or retired
    assert {r["dp_rank"]: r["instance_id"] for r in ranks} == instances
    assert all(r["status"] == "live" for r in ranks)
    assert f"ignored load report instance={FORGER}" in log
    assert "rank restarted" not in log
    status, info = get(server.url + "/get_server_info")
    assert status == 200
    assert [(st["dp_rank"], st["live"]) for st in info["internal_states"]] == [(0, True), (1, True)]


# --- a disaggregated deployment: the prefill and KV subjects too ----------------------------------

PD_PREFIX = "pdfuzz"
PREFILL, DECODE = 1, 0  # global DP ranks of `--prefill-dp-size 1 --decode-dp-size 1`


@pytest.fixture(scope="module")
def pd_server(server_factory: Any, nats_url: str) -> Any:
    return server_factory("--nats-url", nats_url, "--nats-subject-prefix", PD_PREFIX, "--prefill-dp-size", "1",
                          "--decode-dp-size", "1", "--disaggregation-min-prompt-tokens", "64")


def pd_messages(gateway_id: str, prefill_instance: str) -> tuple[list[msgspec.Struct], list[msgspec.Struct]]:
    """(valid, nonsense) for the prefill rank's tasks and the decode rank's PrefillDones: tasks for
    a stale instance, with bad tags, skips, sizes or tokens (refused, or answered not ok once the
    rows turn out to be another size); PrefillDones for nobody's request; a forged prefill rank's
    report, which must not make the decode rank give up on the real one."""
    req = TokenizedRequest(rid="pd-forged", gateway_id=gateway_id, input_ids=list(range(20, 120)), dispatch_id=2**40)

    def task(**kw: Any) -> PrefillTask:
        return PrefillTask(**({"req": req, "decode_dp_rank": DECODE, "pair_key": "nobody", "tag": 5, "skip": 0,
                               "nbytes": 0, "prefill_instance": "stale"} | kw))

    out = TokenOutput(rid="ghost", gateway_id=gateway_id, seq=0, ids=[1], num_new=1, prompt_tokens=1, completion_tokens=1)
    valid = [task(), PrefillDone(rid="ghost", tag=3, ok=True, pair_key="nobody", nbytes=64, output=out, rng_state=b"x")]
    nonsense = [
        task(decode_dp_rank=-9),
        *(task(prefill_instance=prefill_instance, **kw) for kw in (
            {"tag": 0}, {"tag": -3}, {"tag": 2**40}, {"skip": -1}, {"skip": 100}, {"nbytes": -1})),
        task(prefill_instance=prefill_instance, req=TokenizedRequest(rid="pd-bad-ids", gateway_id=gateway_id,
                                                                     input_ids=[-5, 2**40]), nbytes=8),
        task(prefill_instance=prefill_instance, req=TokenizedRequest(rid="pd-nan", gateway_id=gateway_id, input_ids=[5, 6],
                                                                     sampling=SamplingParams(temperature=math.nan))),
        task(prefill_instance=prefill_instance, req=TokenizedRequest(rid="pd-bad-size", gateway_id=gateway_id,
                                                                     input_ids=list(range(20, 120))), nbytes=7),
        PrefillDone(rid="ghost", tag=1, ok=True, pair_key="nobody", nbytes=2**50),
        PrefillDone(rid="ghost", tag=-1, ok=True, nbytes=-1, rng_state=b"junk", output=out),
        PrefillDone(rid="ghost", tag=0, ok=False, message="forged"),
        LoadReport(dp_rank=PREFILL, seq=2**40, timestamp=1.0, holding_tokens=0, num_running=0, num_waiting=0,
                   kv_used=0, kv_total=10, instance_id=FORGER, mode="prefill", bootstrap_addr="203.0.113.1:1"),
    ]
    return valid, nonsense


@pytest.mark.slow
async def test_bus_fuzz_of_a_disaggregated_deployment_ships_every_prompt(pd_server: Any, nats_url: str) -> None:
    server = pd_server
    gateway_id = re.search(r"gateway_id=(\w+)", server.log()).group(1)  # type: ignore[union-attr]
    instances = live_instances(server.url)  # the prefill rank too: until it reports, prompts stay on the decode rank
    prompts = [[20 + (k * 131 + i * 37 + i * i) % 900 for i in range(200)] for k in range(6)]  # each is shipped
    solo = [generate(server.url, input_ids=p, sampling_params=GREEDY)["output_ids"] for p in prompts]
    remote = wait_metric(server.url, "dpserve:prefill_requests_total", len(prompts), mode="decode", where="remote")
    assert remote == len(prompts)
    flushed = server.log().count("flush_cache freed=")
    assert post(server.url + "/flush_cache", {})[0] == 200  # so the decode rank has none of them cached
    deadline = time.monotonic() + 20
    while server.log().count("flush_cache freed=") < flushed + 2:
        assert time.monotonic() < deadline, "the ranks did not flush their caches"
        time.sleep(0.05)

    s = Subjects(PD_PREFIX)
    valid, nonsense = pd_messages(gateway_id, instances[PREFILL])
    subjects = [s.sched_prefill(PREFILL), s.sched_kv(DECODE), s.sched_prefill(DECODE), s.sched_kv(PREFILL),
                s.sched_req(DECODE), s.load(PREFILL), s.load(DECODE), s.dispatch, s.detok, s.sched_control,
                s.metrics, s.rank_register, s.dispatcher_loads]
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(len(prompts)) as pool:
        running = [loop.run_in_executor(pool, lambda p=p: generate(server.url, input_ids=p, sampling_params=GREEDY))
                   for p in prompts]
        sent = await flood(nats_url, subjects, gateway_id, valid, nonsense)
        results = await asyncio.gather(*running)
    assert sent >= N_MESSAGES
    assert [r["output_ids"] for r in results] == solo
    # every one was shipped again: the forged prefill rank's report made the decode rank give up on none
    log = server.log()
    assert "prefilled locally" not in log, log[-3000:]
    assert wait_metric(server.url, "dpserve:prefill_requests_total", 2 * len(prompts), mode="decode",
                       where="remote") == 2 * len(prompts)
    assert "refused prefill task rid=pd-forged" in log and "bad task: tag 0" in log
    assert "the decode rank expects 7 KV bytes" in log  # prefilled, then answered not ok
    assert "refused prefill task rid=pd-nan: sampling parameters must be finite" in log  # the checks of a dispatched request

    time.sleep(1.0)
    assert server.proc.poll() is None and "exited code" not in log and "forward failed" not in log
    assert "handler failed" not in log
    drops = [line for line in server.log().splitlines() if "dropped undecodable message" in line]
    assert sum("scheduler" in line for line in drops) >= 2  # both ranks' subscriptions dropped garbage
    # a new long prompt is still shipped, and every rank goes back to idle with the same instance
    fresh = [20 + (i * 53) % 900 for i in range(300)]
    before = metric(server.url, "dpserve:prefill_requests_total", mode="decode", where="remote")
    generate(server.url, input_ids=fresh, sampling_params=GREEDY)
    assert wait_metric(server.url, "dpserve:prefill_requests_total", before + 1, mode="decode", where="remote") > before
    deadline = time.monotonic() + 10
    while True:
        ranks = {r["dp_rank"]: r for r in get(server.url + "/get_loads")[1]["ranks"]}
        if all(r["kv_used"] == 0 and r["num_running"] == 0 for r in ranks.values()):
            break
        assert time.monotonic() < deadline, ranks
        time.sleep(0.2)
    assert {k: r["instance_id"] for k, r in ranks.items()} == instances
    assert all(r["status"] == "live" for r in ranks.values())
