"""Prefill/decode disaggregation inside the engines: a prefill engine prefills and exports the
prompt's rows, a decode engine reserves its slots, installs them and decodes on. Outputs must be
those of one colocated engine; the accounting must hold through installs, fallbacks and aborts."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from services.dispatcher.disaggregation import Disaggregation, DisaggregationConfig
from services.dispatcher.loads import RankState
from services.gateway.metrics import GatewayMetrics
from services.scheduler.disagg.decode_side import PREFILL_INSTANCES, DecodeSide
from services.scheduler.disagg.metrics import DisaggMetrics
from services.scheduler.disagg.prefill_side import PrefillSide
from services.scheduler.disagg.transfer import FakeTransferEngine, GlooTransferEngine, KVPoll, Peer
from services.scheduler.engine import Engine
from services.scheduler.request import Req
from shared.messages import (
    FinishReason,
    LoadReport,
    PrefillDone,
    PrefillTask,
    TextBatch,
    TextOutput,
    TokenizedRequest,
    TokenOutput,
)
from shared.metrics import render
from shared.subjects import Subjects
from tests.fakes import FakeBus
from tests.unit.test_engine import Rig, make_req, run, workload


def prefill_remotely(prefill: Engine, decode: Engine, reqs: list[Req], clone: Any) -> tuple[list[TokenOutput], dict[str, int]]:
    """Every request the decode engine reserves goes through `prefill` (a copy of it there, ending
    at its first token); returns the decode engine's outputs of the installs and each skip."""
    skips: dict[str, int] = {}
    for req in reqs:
        skip = decode.add_remote(req)
        if skip is not None:
            skips[req.rid] = skip
            task = clone(req)
            task.ships_kv_from = skip
            prefill.add(task)
    firsts: dict[str, TokenOutput] = {}
    shipped: dict[str, Req] = {}
    while prefill.has_work:
        for out in prefill.step().outputs:
            firsts[out.rid] = out
        shipped |= {r.rid: r for r in prefill.take_shipped()}
        prefill.assert_invariants()
    prefill.assert_idle_invariants()
    outputs = []
    for rid, skip in skips.items():
        src = shipped[rid]
        assert src.kv_rows is not None and src.kv_rows.shape[1] == len(src.input_ids) - skip
        rng = src.generator.get_state().numpy().tobytes() if src.generator is not None else b""
        outputs += decode.install_remote(decode.transferring[rid], src.kv_rows, skip, firsts[rid], rng)
        decode.assert_invariants()
    return outputs, skips


def clone_of(reqs: list[Req]) -> Any:
    by_rid = {r.rid: r for r in reqs}
    return lambda r: Req(rid=r.rid, gateway_id="g", input_ids=list(r.input_ids), sampling=by_rid[r.rid].sampling,
                         return_logprob=r.return_logprob, top_logprobs_num=r.top_logprobs_num,
                         logprob_start_len=r.logprob_start_len)


def finish(engine: Engine, early: list[TokenOutput]) -> dict[str, TokenOutput]:
    done = {o.rid: o for o in early if o.finish is not None}
    done |= run(engine, [])
    return done


def test_greedy_output_equals_the_colocated_engines(rig: Rig) -> None:
    colocated = run(rig.engine(), workload(3))
    prefill, decode = rig.engine(), rig.engine()
    reqs = workload(3)
    early, skips = prefill_remotely(prefill, decode, reqs, clone_of(workload(3)))
    assert len(skips) == len(reqs)
    done = finish(decode, early)
    assert {r: o.all_ids for r, o in done.items()} == {r: o.all_ids for r, o in colocated.items()}
    assert prefill.cache.cached_size > 0 and decode.cache.cached_size > 0  # both keep the prompts


def test_logprobs_and_seeded_sampling_survive_the_move(rig: Rig) -> None:
    def reqs() -> list[Req]:
        out = []
        for i, p in enumerate(([5, 9, 33, 71, 2, 8] * 7, [100 + i for i in range(30)])):
            r = make_req(f"s{i}", p, temperature=0.9, seed=1234 + i, max_new_tokens=10)
            r.return_logprob, r.top_logprobs_num, r.logprob_start_len = True, 2, 0
            out.append(r)
        return out

    colocated = run(rig.engine(), reqs())
    prefill, decode = rig.engine(), rig.engine()
    early, _ = prefill_remotely(prefill, decode, reqs(), clone_of(reqs()))
    done = finish(decode, early)
    for rid, want in colocated.items():
        got = done[rid]
        assert got.all_ids == want.all_ids
        assert got.input_token_logprobs is not None and want.input_token_logprobs is not None
        assert [t for _, t in got.input_token_logprobs] == [t for _, t in want.input_token_logprobs]
        assert [lp or 0.0 for lp, _ in got.input_token_logprobs] == pytest.approx(
            [lp or 0.0 for lp, _ in want.input_token_logprobs], abs=1e-4)
        assert [t for _, t in got.output_token_logprobs] == [t for _, t in want.output_token_logprobs]


def test_the_decode_ranks_cached_prefix_is_not_shipped(rig: Rig) -> None:
    shared = list(range(10, 90))
    decode, prefill = rig.engine(), rig.engine()
    run(decode, [make_req("warm", shared + [3, 4])])
    reqs = [make_req("a", shared + [7, 8, 9, 10])]
    early, skips = prefill_remotely(prefill, decode, reqs, clone_of([make_req("a", shared + [7, 8, 9, 10])]))
    assert skips["a"] == len(shared)  # only the tail comes over
    want = run(rig.engine(), [make_req("a", shared + [7, 8, 9, 10])])
    assert finish(decode, early)["a"].all_ids == want["a"].all_ids


def test_a_failed_transfer_is_prefilled_locally_with_the_same_output(rig: Rig) -> None:
    decode = rig.engine()
    reqs = workload(5)
    free = decode.pool.num_free
    for r in reqs:
        assert decode.add_remote(r) is not None
    assert decode.pool.num_free < free and decode.has_work
    decode.assert_invariants()
    for r in list(decode.transferring.values()):
        decode.prefill_locally(r)
    decode.assert_invariants()
    done = run(decode, [])
    want = run(rig.engine(), workload(5))
    assert {r: o.all_ids for r, o in done.items()} == {r: o.all_ids for r, o in want.items()}


def test_abort_while_transferring_frees_the_reserved_slots(rig: Rig) -> None:
    decode = rig.engine()
    r = make_req("x", list(range(1, 120)))
    assert decode.add_remote(r) == 0
    assert decode.abort("x") is r and r.finish is not None and r.finish.type == "abort"
    assert [o.rid for o in decode.drain_finished_early()] == ["x"]
    decode.assert_idle_invariants()


def test_no_room_means_a_local_prefill(rig: Rig) -> None:
    decode = rig.engine(pool=200)
    assert decode.add_remote(make_req("a", list(range(1, 150)), max_new_tokens=40)) == 0
    assert decode.add_remote(make_req("b", list(range(1, 150)), max_new_tokens=40)) is None
    assert [r.rid for r in decode.prefill.waiting] == ["b"]


def test_fake_transfer_engine_moves_rows_and_fails_on_size_mismatch() -> None:
    rx_side, tx_side = FakeTransferEngine("decode"), FakeTransferEngine("prefill")
    rows = torch.randn(2, 5, 3)
    rx = rx_side.receiver(Peer("fake:0", "k"), 1, rows.numel() * 4)
    tx = tx_side.sender(Peer("", "k"), 1)
    assert tx.poll() == KVPoll.WAITING_FOR_INPUT and rx.poll() == KVPoll.TRANSFERRING
    tx.send(rows)
    assert tx.poll() == rx.poll() == KVPoll.SUCCESS
    assert torch.equal(rx.buffer.view(torch.float32).view(2, 5, 3), rows)
    rx = rx_side.receiver(Peer("fake:0", "k"), 2, 8)
    tx = tx_side.sender(Peer("", "k"), 2)
    tx.send(rows)
    assert tx.poll() == rx.poll() == KVPoll.FAILED


def test_gloo_pair_ships_rows_between_two_engines() -> None:
    prefill = GlooTransferEngine("prefill", timeout_s=20)
    decode = GlooTransferEngine("decode", timeout_s=20)
    try:
        rows = torch.randn(3, 700, 2, 16, dtype=torch.bfloat16)
        nbytes = rows.numel() * rows.element_size()
        peer = Peer(prefill.bootstrap_addr, "d1-p1-0")
        rxs = [decode.receiver(peer, tag, nbytes) for tag in (5, 6)]
        txs = [prefill.sender(Peer("", "d1-p1-0"), tag) for tag in (6, 5)]  # out of order: tags tell them apart
        txs[0].send(rows * 2)
        txs[1].send(rows)
        for t in rxs + txs:
            assert t.result.result(timeout=20) == KVPoll.SUCCESS, t.error
        assert torch.equal(rxs[0].buffer.view(torch.bfloat16).view(rows.shape), rows)
        assert torch.equal(rxs[1].buffer.view(torch.bfloat16).view(rows.shape), rows * 2)
    finally:
        prefill.close()
        decode.close()


def test_a_decode_rank_receives_into_a_released_buffer_again() -> None:
    prefill = GlooTransferEngine("prefill", timeout_s=20)
    decode = GlooTransferEngine("decode", timeout_s=20)
    try:
        peer = Peer(prefill.bootstrap_addr, "d2-p2-0")

        def ship(tag: int, rows: torch.Tensor) -> Any:
            rx = decode.receiver(peer, tag, rows.numel() * rows.element_size())
            prefill.sender(Peer("", peer.key), tag).send(rows)
            assert rx.result.result(timeout=20) == KVPoll.SUCCESS, rx.error
            assert torch.equal(rx.buffer.view(rows.dtype).view(rows.shape), rows)
            return rx

        first = ship(1, torch.randn(4, 300, 8))
        storage = first.base.data_ptr()
        decode.release(first)
        assert first.buffer.numel() == 0  # the receiver gave its buffer up
        second = ship(2, torch.randn(4, 200, 8))  # smaller: the same storage, and its own bytes in it
        assert second.base.data_ptr() == storage and second.buffer.numel() == 4 * 200 * 8 * 4
        third = ship(3, torch.randn(4, 100, 8))  # the buffer is still the second's: a new one
        assert third.base.data_ptr() != storage
    finally:
        prefill.close()
        decode.close()


def test_gloo_receiver_fails_when_no_prefill_rank_listens() -> None:
    decode = GlooTransferEngine("decode", timeout_s=2)
    try:
        with socket_port() as port:
            rx = decode.receiver(Peer(f"127.0.0.1:{port}", "k"), 1, 16)
            assert rx.result.result(timeout=30) == KVPoll.FAILED
            assert "failed" in rx.error
            decode.release(rx)  # a failed receive's buffer is not kept: its gloo operation may not be over
            assert decode._kept_buffer(1) is None
    finally:
        decode.close()


def test_a_prefill_rank_drops_the_pair_of_a_decode_rank_that_died() -> None:
    """Both ends keep a canary receive posted: when the decode rank's process dies, the prefill
    rank's end breaks and is dropped (it keeps no gloo group of a decode rank that died)."""
    prefill = GlooTransferEngine("prefill", timeout_s=20)
    peer = Peer("", "d9-p1-0")
    script = ("import sys, time\n"
              "from services.scheduler.disagg.transfer import GlooTransferEngine, Peer\n"
              "d = GlooTransferEngine('decode', timeout_s=20)\n"
              "d.connect(Peer(sys.argv[1], 'd9-p1-0'))\n"
              "d._pairs['d9-p1-0'].result(timeout=20)\n"
              "print('connected', flush=True)\n"
              "time.sleep(120)\n")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", script, prefill.bootstrap_addr], stdout=subprocess.PIPE, cwd=root)
    try:
        prefill.connect(peer)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"connected"
        prefill._pairs[peer.key].result(timeout=20)
        assert prefill.broken(peer) == ""
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 20
        while not prefill.broken(peer):
            assert time.monotonic() < deadline, "the prefill rank never saw the decode rank die"
            time.sleep(0.05)
        assert "the decode rank's end of the pair closed" in prefill.broken(peer)
        assert peer.key not in prefill._pairs
    finally:
        proc.kill()
        prefill.close()


class socket_port:
    """A port nothing listens on (bound, never listening)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


# --- the dispatcher's decision --------------------------------------------------------------


def rank(dp_rank: int, holding: int = 0, mode: str = "prefill") -> RankState:
    r = RankState(dp_rank)
    r.report = LoadReport(dp_rank=dp_rank, seq=1, timestamp=0.0, holding_tokens=holding, num_running=0,
                          num_waiting=0, kv_used=0, kv_total=1000, mode=mode)
    r.live = True
    return r


def request(n: int, dispatch_id: int = 1, **kw: Any) -> TokenizedRequest:
    start = 1000 * dispatch_id  # prompts of different requests share nothing
    return TokenizedRequest(rid=f"r{dispatch_id}", gateway_id="g", input_ids=list(range(start, start + n)),
                            dispatch_id=dispatch_id, **kw)


def test_short_uncached_and_resumed_prompts_stay_on_the_decode_rank() -> None:
    d = Disaggregation(DisaggregationConfig(min_prompt_tokens=100))
    ranks = [rank(2), rank(3)]
    assert d.place(request(99), 0, ranks) is None
    assert d.place(request(400, 2), 350, ranks) is None  # the decode rank has most of it cached
    assert d.place(request(400, 3, resume_output_ids=[1, 2]), 0, ranks) is None
    assert d.place(request(400, 4), 0, ranks) == 2
    assert dict(d.decisions) == {("local", "short"): 2, ("local", "resumed"): 1, ("remote", "least_queued"): 1}


def test_prefill_rank_by_cache_then_by_queue_and_tasks_count_until_taken() -> None:
    clock = [0.0]
    d = Disaggregation(DisaggregationConfig(min_prompt_tokens=10, max_prefill_queue=1000), lambda: clock[0])
    ranks = [rank(2, holding=300), rank(3, holding=100)]
    first = request(500, 1)
    assert d.place(first, 0, ranks) == 3  # fewer tokens queued
    assert d.place(request(500, 2), 0, ranks) == 2  # rank 3 now has 100 + 500 queued
    same_prefix = TokenizedRequest(rid="x", gateway_id="g", input_ids=first.input_ids + [7, 8], dispatch_id=3)
    assert d.place(same_prefix, 0, ranks) == 3  # it cached that prompt
    d.on_report(LoadReport(dp_rank=3, seq=2, timestamp=0.0, holding_tokens=100, num_running=0, num_waiting=0,
                           kv_used=0, kv_total=1000, mode="prefill", tasks_accepted=[1, 3]))
    assert d.queued(ranks[1]) == 100  # tasks 1 and 3 are in its reported holding now
    assert d.queued(ranks[0]) == 800
    clock[0] = 1000.0  # a task never reported taken stops counting
    assert d.queued(ranks[0]) == 300
    busy = [rank(2, holding=1500), rank(3, holding=1200)]
    assert d.place(request(600, 9), 0, busy) is None  # both queues are past 1000: prefill locally
    assert d.decisions["local", "prefill_queue_full"] == 1



# --- the gateway's latencies by where the prompt was prefilled ------------------------------------


def test_gateway_times_disaggregated_requests_by_where_they_were_prefilled() -> None:
    now = [0.0]
    m = GatewayMetrics(clock=lambda: now[0])

    def step(rid: str, ids: list[int], prefill: str, finish: bool = False) -> TextOutput:
        return TextOutput(rid=rid, seq=0, text="x", new_ids=ids, prompt_tokens=3, completion_tokens=len(ids),
                          prefill=prefill, finish=FinishReason(type="length") if finish else None)

    for rid in ("remote", "local", "colocated"):
        m.on_start(rid)
    now[0] = 0.25
    m.observe(TextBatch(outputs=[step("remote", [1], "remote"), step("local", [1], "local"), step("colocated", [1], "")]))
    now[0] = 0.5
    m.observe(TextBatch(outputs=[step("remote", [2, 3], "remote", True), step("local", [2], "local", True)]))
    assert (m.ttft_by_prefill["remote"].count, m.ttft_by_prefill["local"].count, m.ttft.count) == (1, 1, 1)
    assert (m.itl_by_prefill["remote"].count, m.itl_by_prefill["local"].count, m.itl.count) == (2, 1, 0)
    text = render(m.local_samples(0))
    assert 'dpserve:time_to_first_token_seconds_count{prefill="remote"} 1' in text
    assert 'dpserve:inter_token_latency_seconds_count{prefill="local"} 1' in text
    assert "dpserve:time_to_first_token_seconds_count 1" in text  # the colocated request, unlabelled
    assert not m._prefill  # forgotten once they ended (the colocated one never had an entry)


# --- a prefill rank's tasks from the bus ------------------------------------------------------------


def test_prefill_side_refuses_bad_or_stale_tasks_and_answers_each() -> None:
    async def scenario() -> FakeBus:
        bus = FakeBus()
        spawned: list[asyncio.Task[None]] = []
        side = PrefillSide(bus, Subjects(), FakeTransferEngine("prefill"), "inst", DisaggMetrics(2, "prefill"),
                           lambda c: spawned.append(asyncio.ensure_future(c)), logging.getLogger("test"))
        req = request(40, 7)

        def task(**kw: Any) -> PrefillTask:
            return PrefillTask(**({"req": req, "decode_dp_rank": 1, "pair_key": "k", "tag": 3, "skip": 0,
                                   "nbytes": 40 * 16, "prefill_instance": "inst"} | kw))

        assert side.take_task(task(prefill_instance="old")) is None  # meant for a restarted instance
        assert side.take_task(task(tag=-1)) is None
        assert side.take_task(task(skip=40)) is None
        assert side.take_task(task(), "the rank's own checks of the request failed") is None
        assert side.take_task(task()) is req  # taken: the engine prefills it
        assert side.take_task(task()) is None  # the same rid again
        assert side.take_report() == [7]
        await asyncio.gather(*spawned)
        return bus

    bus = asyncio.run(scenario())
    dones = bus.of(PrefillDone)
    assert [d.ok for d in dones] == [False] * 5
    assert all(subject == Subjects().sched_kv(1) for subject, _ in bus.sent)
    assert "restarted" in dones[0].message and "bad task" in dones[1].message and "already" in dones[4].message
    assert dones[3].message == "the rank's own checks of the request failed"


def test_a_constrained_request_keeps_its_grammar_across_the_move(rig: Rig) -> None:
    def reqs() -> list[Req]:
        return [make_req("g", list(range(20, 90)), regex="[0-9]{3}-[a-z]{2}", ignore_eos=False, max_new_tokens=20)]

    colocated = run(rig.engine(), reqs())
    prefill, decode = rig.engine(), rig.engine()
    early, skips = prefill_remotely(prefill, decode, reqs(), clone_of(reqs()))
    assert skips == {"g": 0}
    done = finish(decode, early)
    assert done["g"].all_ids == colocated["g"].all_ids
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", rig.tokenizer.decode(done["g"].all_ids, skip_special_tokens=True))


def test_a_decode_rank_fails_a_prefill_instance_only_when_its_own_reports_stop(rig: Rig) -> None:
    """Reports of other instances for the prefill rank (forged ones, a flood of them) leave the
    transfer waiting; the named instance falling silent fails it, and the request is prefilled here."""
    dead_after = 0.3

    def report(instance: str) -> LoadReport:
        return LoadReport(dp_rank=1, seq=1, timestamp=0.0, holding_tokens=0, num_running=0, num_waiting=0, kv_used=0,
                          kv_total=10, instance_id=instance, mode="prefill", bootstrap_addr="127.0.0.1:1")

    async def scenario() -> tuple[FakeBus, Engine, DecodeSide, Req]:
        bus, engine = FakeBus(), rig.engine()
        side = DecodeSide(bus, Subjects(), FakeTransferEngine("decode"), engine, 0, "dec", timeout_s=60,
                          dead_after_s=dead_after, min_prompt_tokens=16, metrics=DisaggMetrics(0, "decode"),
                          wake=lambda: None, log=logging.getLogger("test"))
        await side.on_load(report("live"))
        msg = TokenizedRequest(rid="r", gateway_id="g", input_ids=list(range(20, 84)), prefill_dp_rank=1,
                               prefill_bootstrap="127.0.0.1:1", prefill_instance="live")
        req = Req.from_msg(msg)
        await side.add(req, msg)
        assert [t.prefill_instance for t in bus.of(PrefillTask)] == ["live"]
        for i in range(2 * PREFILL_INSTANCES):  # more forged instances than it remembers
            await side.on_load(report(f"forged{i}"))
            if i % 100 == 0:
                await side.on_load(report("live"))
        assert len(side.heard) == PREFILL_INSTANCES
        return bus, engine, side, req

    bus, engine, side, req = asyncio.run(scenario())
    assert asyncio.run(side.poll()) == [] and req.rid in engine.transferring  # still waiting for its rows
    side.heard["live"].seen = time.monotonic()
    for instance in list(side.heard):  # the forged instances fall silent too: no other prefill rank to try
        side.heard[instance].seen -= 10
    side.heard["live"].seen = time.monotonic()
    time.sleep(dead_after + 0.1)  # "live" says nothing more
    assert asyncio.run(side.poll()) == [] and req.rid not in engine.transferring
    assert side.metrics.failures["prefill_rank_lost"] == 1
    done = run(engine, [])
    assert done[req.rid].finish is not None and engine.kv_used == 0
    engine.assert_idle_invariants()


def test_a_failed_prefill_rank_is_retried_once_on_another_then_the_decode_rank_prefills(rig: Rig) -> None:
    """A refusal (or a broken pair, or a silent rank) sends the task once more, to the least loaded
    other live prefill instance, with the reservation kept; a second failure prefills here. A
    timeout is never retried: its budget is the whole wait."""

    def report(dp_rank: int, instance: str, holding: int) -> LoadReport:
        return LoadReport(dp_rank=dp_rank, seq=1, timestamp=0.0, holding_tokens=holding, num_running=0, num_waiting=0,
                          kv_used=0, kv_total=10, instance_id=instance, mode="prefill",
                          bootstrap_addr=f"127.0.0.1:{dp_rank}")

    async def scenario() -> None:
        bus, engine = FakeBus(), rig.engine()
        side = DecodeSide(bus, Subjects(), FakeTransferEngine("decode"), engine, 0, "dec", timeout_s=60,
                          dead_after_s=30, min_prompt_tokens=16, metrics=DisaggMetrics(0, "decode"),
                          wake=lambda: None, log=logging.getLogger("test"))
        for dp_rank, instance, holding in ((1, "p1", 0), (2, "p2", 500), (3, "p3", 100)):
            await side.on_load(report(dp_rank, instance, holding))
        msg = TokenizedRequest(rid="r", gateway_id="g", input_ids=list(range(20, 84)), prefill_dp_rank=1,
                               prefill_bootstrap="127.0.0.1:1", prefill_instance="p1")
        req = Req.from_msg(msg)
        await side.add(req, msg)
        slots = engine.kv_used

        async def refuse() -> PrefillTask:
            (subject, task), = bus.take()
            await side.on_done(PrefillDone(rid="r", tag=task.tag, ok=False, message="busy", pair_key=task.pair_key))
            return task

        first = await refuse()
        assert first.prefill_instance == "p1" and await side.poll() == []
        (subject, second), = bus.sent  # p3: the least loaded of the others
        assert subject == Subjects().sched_prefill(3) and second.prefill_instance == "p3"
        assert (second.skip, second.nbytes) == (first.skip, first.nbytes) and second.tag != first.tag
        assert req.rid in engine.transferring and engine.kv_used == slots  # the reservation kept
        await refuse()
        assert await side.poll() == [] and bus.sent == []  # no third rank tried
        assert req.rid not in engine.transferring
        assert side.metrics.failures["refused"] == 2 and side.metrics.retries == 1
        assert side.metrics.prefills["local"] == 1
        done = run(engine, [])
        assert done["r"].finish is not None and engine.kv_used == 0

        # a timeout is not retried, though other prefill ranks are live
        side.timeout_s = 0.0
        msg2 = TokenizedRequest(rid="t", gateway_id="g", input_ids=list(range(100, 164)), prefill_dp_rank=1,
                                prefill_bootstrap="127.0.0.1:1", prefill_instance="p1")
        late = Req.from_msg(msg2)
        await side.add(late, msg2)
        bus.take()
        assert await side.poll() == [] and bus.sent == [] and late.rid not in engine.transferring
        assert side.metrics.failures["timeout"] == 1 and side.metrics.retries == 1

    asyncio.run(scenario())
