"""The dispatcher service over a fake bus and a fake clock: routing overrides, dead ranks,
restarts, the registry, timeouts, migration. Tests call the handlers and the watch step
(`expire`) directly; the service is never started, so no background task runs."""

from __future__ import annotations

import pytest

from services.dispatcher.migration import FINAL_GRACE, PARK_TIMEOUT
from services.dispatcher.service import PENDING_TIMEOUT, DispatcherService
from shared.config import ServerArgs
from shared.messages import (
    Abort,
    LoadReport,
    LoadTableQuery,
    RankHello,
    RequestError,
    Resume,
    TextBatch,
    TokenizedRequest,
)
from tests.fakes import FakeBus, FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def svc(clock: FakeClock) -> DispatcherService:
    service = DispatcherService(ServerArgs(dp_size=2, load_balance_method="minimum_tokens"), clock=clock)
    service.bus = FakeBus()  # type: ignore[assignment]
    return service


def report(dp_rank: int, seq: int, accepted: list[int] | None = None, finished: list[int] | None = None,
           instance: str = "i0", holding: int = 0) -> LoadReport:
    return LoadReport(dp_rank=dp_rank, seq=seq, timestamp=0.0, holding_tokens=holding, num_running=0,
                      num_waiting=0, kv_used=0, kv_total=10, accepted=accepted or [], finished=finished or [],
                      instance_id=instance)


def request(i: int, n: int = 10, routed: int | None = None) -> TokenizedRequest:
    return TokenizedRequest(rid=f"r{i}", gateway_id="g", input_ids=[1] * n, routed_dp_rank=routed)


def sent_to(bus: FakeBus) -> dict[str, int]:
    """rid -> dp_rank for every request published in `bus.sent`."""
    return {m.rid: int(s.split(".")[2]) for s, m in bus.sent if isinstance(m, TokenizedRequest)}


async def test_routed_dp_rank_overrides_the_method(svc: DispatcherService) -> None:
    await svc.on_report(report(0, 1))
    await svc.on_report(report(1, 1, holding=10_000))
    await svc.on_request(request(1, routed=1))
    await svc.on_request(request(2))
    await svc.on_request(request(3, routed=5))
    bus: FakeBus = svc.bus  # type: ignore[assignment]
    assert sent_to(bus) == {"r1": 1, "r2": 0}
    errors = [o for s, m in bus.sent if isinstance(m, TextBatch) for o in m.outputs]
    assert errors[0].rid == "r3" and errors[0].status == 400 and "not a live DP rank" in errors[0].message


async def test_dead_rank_redispatches_in_flight_and_fails_accepted(svc: DispatcherService, clock: FakeClock) -> None:
    bus: FakeBus = svc.bus  # type: ignore[assignment]
    await svc.on_report(report(0, 1))
    await svc.on_report(report(1, 1, holding=10_000))  # everything goes to rank 0 first
    for i in range(1, 5):
        await svc.on_request(request(i))
    assert set(sent_to(bus).values()) == {0}
    await svc.on_report(report(0, 2, accepted=[1, 2]))  # 1 and 2 accepted, 3 and 4 in flight
    await svc.on_report(report(0, 3, finished=[1]))  # 1 done
    bus.take()
    clock.now += 2 * svc.dead_after
    await svc.on_report(report(1, 2, holding=10_000))  # rank 1 keeps reporting, rank 0 went silent
    await svc.expire()
    assert sent_to(bus) == {"r3": 1, "r4": 1}  # re-dispatched to the live rank
    errors = [o for s, m in bus.sent if isinstance(m, TextBatch) for o in m.outputs]
    assert [(e.rid, e.status) for e in errors] == [("r2", 503)]
    assert "DP rank 0 stopped reporting while serving" in errors[0].message
    aborts = sorted((m.rid, m.dp_rank) for s, m in bus.sent if isinstance(m, Abort))
    assert aborts == [("r2", 0), ("r3", 0), ("r4", 0)]  # only rank 0 drops them
    assert [r.dp_rank for r in svc.table.live_ranks()] == [1]
    await svc.on_request(request(5))
    assert sent_to(bus)["r5"] == 1  # nothing more to the dead rank
    bus.take()
    # rank 0 resumes (a SIGCONT): live again; what it accepted meanwhile is aborted there
    await svc.on_report(report(0, 4, accepted=[3]))
    assert [r.dp_rank for r in svc.table.live_ranks()] == [0, 1]
    assert [(m.rid, m.dp_rank) for s, m in bus.sent if isinstance(m, Abort)] == [("r3", 0)]


async def test_restarted_rank_gets_its_lost_requests_back_elsewhere(svc: DispatcherService, clock: FakeClock) -> None:
    bus: FakeBus = svc.bus  # type: ignore[assignment]
    await svc.on_report(report(0, 1))
    await svc.on_report(report(1, 1, holding=10_000))
    await svc.on_request(request(1))
    await svc.on_request(request(2))
    await svc.on_report(report(0, 2, accepted=[1]))
    bus.take()
    # the new process says hello first; while the old one is live, the rank stays the old one's
    refused = await svc.on_hello(RankHello(instance_id="new", requested_dp_rank=0))
    assert refused.dp_rank is None and "held by live instance i0" in refused.message
    await svc.on_report(report(0, 1, instance="new"))
    assert not bus.sent and svc.table.rank(0).instance_id == "i0"
    clock.now += 2 * svc.dead_after  # the old process is gone; the dispatcher has not expired it yet
    await svc.on_report(report(1, 2, holding=10_000))
    confirmed = await svc.on_hello(RankHello(instance_id="new", requested_dp_rank=0))
    assert (confirmed.dp_rank, confirmed.message) == (0, "confirmed")
    await svc.on_report(report(0, 2, instance="new"))
    assert svc.table.rank(0).instance_id == "new"
    assert sent_to(bus) == {"r2": 0}  # in flight to the old process: dispatched again (rank 0 is lightest)
    errors = [o for s, m in bus.sent if isinstance(m, TextBatch) for o in m.outputs]
    assert [(e.rid, e.status) for e in errors] == [("r1", 503)]
    assert "restarted" in errors[0].message
    bus.take()
    await svc.on_report(report(0, 3, accepted=[5], instance="i0"))  # the old one resumes: retired
    assert not bus.sent and svc.table.rank(0).instance_id == "new"


async def test_forged_report_for_a_live_rank_changes_nothing(svc: DispatcherService,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    bus: FakeBus = svc.bus  # type: ignore[assignment]
    await svc.on_report(report(0, 1))
    await svc.on_report(report(1, 1, holding=10_000))
    await svc.on_request(request(1))
    await svc.on_request(request(2))
    await svc.on_report(report(0, 2, accepted=[1]))
    bus.take()
    for seq in range(1, 6):  # a bus client claims rank 0 with a well-formed report of a new instance
        await svc.on_report(report(0, seq, accepted=[2], finished=[1], instance="forger", holding=99))
    assert not bus.sent  # nothing re-dispatched, failed or aborted
    rank = svc.table.rank(0)
    assert (rank.instance_id, rank.holding_tokens, sorted(rank.in_flight), sorted(rank.accepted)) == ("i0", 0, [2], [1])
    assert svc.registry.holder(0) == "i0"
    ignored = [r for r in caplog.records if "ignored load report instance=forger" in r.getMessage()]
    assert len(ignored) == 1 and "held by instance i0" in ignored[0].getMessage()  # logged once
    await svc.on_report(report(0, 3, accepted=[2]))  # the real instance still counts
    assert sorted(svc.table.rank(0).accepted) == [1, 2]
    rows = (await svc.on_query(LoadTableQuery())).ranks
    assert [(r.dp_rank, r.instance_id, r.status) for r in rows] == [(0, "i0", "live"), (1, "i0", "live")]


async def test_dead_rank_goes_to_the_next_hello_and_its_old_instance_is_retired(
    svc: DispatcherService, clock: FakeClock
) -> None:
    await svc.on_report(report(0, 1, instance="a"))
    await svc.on_report(report(1, 1, instance="b"))
    assert (await svc.on_hello(RankHello(instance_id="c"))).dp_rank is None  # both held
    assert (await svc.on_hello(RankHello(instance_id="c", requested_dp_rank=7))).dp_rank is None
    clock.now += 2 * svc.dead_after
    await svc.on_report(report(0, 2, instance="a"))  # rank 1 went silent
    await svc.expire()
    assert [r.dp_rank for r in svc.table.live_ranks()] == [0]
    assert (await svc.on_hello(RankHello(instance_id="c"))).dp_rank == 1
    await svc.on_report(report(1, 2, instance="b"))  # b was only frozen: too late, c has rank 1
    assert not svc.table.rank(1).live
    await svc.on_report(report(1, 1, instance="c"))
    assert svc.table.rank(1).live and svc.table.rank(1).instance_id == "c"


async def test_fresh_dispatcher_adopts_running_ranks(svc: DispatcherService) -> None:
    """A restarted dispatcher has an empty registry; running schedulers do not say hello again:
    their reports claim the free ranks, and a late hello of the same instance is answered alike."""
    await svc.on_report(report(0, 40, instance="a"))
    await svc.on_report(report(1, 41, instance="b"))
    assert [r.dp_rank for r in svc.table.live_ranks()] == [0, 1]
    late = await svc.on_hello(RankHello(instance_id="a", requested_dp_rank=0))
    assert (late.dp_rank, late.message) == (0, "already assigned")
    await svc.on_report(report(0, 1, instance="x"))  # now held: another instance is ignored
    assert svc.table.rank(0).instance_id == "a"


async def test_pending_requests_wait_for_the_first_live_rank(svc: DispatcherService) -> None:
    bus: FakeBus = svc.bus  # type: ignore[assignment]
    await svc.on_request(request(1))
    assert not sent_to(bus)
    await svc.on_report(report(1, 1))
    assert sent_to(bus) == {"r1": 1}


async def test_registry_and_load_table_replies(svc: DispatcherService) -> None:
    first = await svc.on_hello(RankHello(instance_id="a"))
    second = await svc.on_hello(RankHello(instance_id="b"))
    third = await svc.on_hello(RankHello(instance_id="c"))
    assert (first.dp_rank, second.dp_rank, third.dp_rank) == (0, 1, None)
    await svc.on_report(report(0, 1, instance="a", holding=7))
    await svc.on_request(request(1, n=5))
    reply = await svc.on_query(LoadTableQuery())
    assert reply.method == "minimum_tokens"
    row = reply.ranks[0]
    assert (row.dp_rank, row.status, row.holding_tokens, row.in_flight_requests, row.in_flight_tokens) == (
        0, "live", 7, 1, 5)


def errors_in(bus: FakeBus) -> list[RequestError]:
    return [o for m in bus.of(TextBatch) for o in m.outputs if isinstance(o, RequestError)]


async def test_pending_request_fails_once_it_waited_too_long(svc: DispatcherService, clock: FakeClock) -> None:
    bus: FakeBus = svc.bus  # type: ignore[assignment]
    await svc.on_request(request(1))
    clock.now += PENDING_TIMEOUT - 1
    await svc.expire()
    assert not bus.sent and len(svc.pending) == 1
    clock.now += 2
    await svc.expire()
    assert [(e.rid, e.status) for e in errors_in(bus)] == [("r1", 503)]
    assert not svc.pending


async def dead_while_serving(svc: DispatcherService, clock: FakeClock) -> None:
    """r1 accepted by rank 0, which then goes silent; rank 1 (heavier) keeps reporting."""
    await svc.on_report(report(0, 1))
    await svc.on_report(report(1, 1, holding=10_000))
    await svc.on_request(request(1))
    await svc.on_report(report(0, 2, accepted=[1]))
    clock.now += 2 * svc.dead_after
    await svc.on_report(report(1, 2, holding=10_000))
    await svc.expire()


async def test_resume_after_migration_dispatches_with_the_gateway_output(svc: DispatcherService,
                                                                         clock: FakeClock) -> None:
    bus: FakeBus = svc.bus  # type: ignore[assignment]
    await dead_while_serving(svc, clock)
    (notice,) = errors_in(bus)
    assert (notice.rid, notice.status, notice.migrate) == ("r1", 503, True)
    bus.take()
    stranger = await svc.on_resume(Resume(rid="r9", gateway_id="g", output_ids=[], first_seq=0))
    assert stranger.status == "unknown"
    forged = await svc.on_resume(Resume(rid="r1", gateway_id="other", output_ids=[1], first_seq=3))
    assert forged.status == "unknown" and not bus.of(TokenizedRequest)  # and r1 stays parked for its gateway
    reply = await svc.on_resume(Resume(rid="r1", gateway_id="g", output_ids=[7, 8], first_seq=3, mode="migrate"))
    assert reply.status == "dispatched"
    (resumed,) = bus.of(TokenizedRequest)
    assert sent_to(bus) == {"r1": 1}
    assert (resumed.resume_output_ids, resumed.first_seq, resumed.dispatch_id) == ([7, 8], 3, 2)
    again = await svc.on_resume(Resume(rid="r1", gateway_id="g", output_ids=[7, 8], first_seq=3))
    assert (again.status, again.dp_rank) == ("running", 1)


async def test_parked_request_fails_when_its_gateway_never_resumes(svc: DispatcherService, clock: FakeClock) -> None:
    bus: FakeBus = svc.bus  # type: ignore[assignment]
    await dead_while_serving(svc, clock)
    bus.take()
    clock.now += PARK_TIMEOUT + 1
    await svc.on_report(report(1, 3, holding=10_000))
    await svc.expire()
    ((rid, status, message),) = [(e.rid, e.status, e.message) for e in errors_in(bus)]
    assert (rid, status) == ("r1", 503) and "migration of the request timed out" in message
    assert (await svc.on_resume(Resume(rid="r1", gateway_id="g", output_ids=[], first_seq=0))).status == "unknown"


async def test_finished_request_reruns_only_after_the_final_grace(svc: DispatcherService, clock: FakeClock) -> None:
    bus: FakeBus = svc.bus  # type: ignore[assignment]
    await svc.on_report(report(0, 1))
    await svc.on_request(request(1))
    await svc.on_report(report(0, 2, accepted=[1], finished=[1]))
    bus.take()
    early = await svc.on_resume(Resume(rid="r1", gateway_id="g", output_ids=[5], first_seq=1))
    assert (early.status, early.message) == ("running", "just finished")
    clock.now += FINAL_GRACE + 0.1  # its final output never reached the gateway: run it again
    late = await svc.on_resume(Resume(rid="r1", gateway_id="g", output_ids=[5], first_seq=1))
    assert late.status == "dispatched" and sent_to(bus) == {"r1": 0}
