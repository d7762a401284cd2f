"""Who may hold a DP rank: the dispatcher's rank registry decides, and the gateway's liveness view
follows one instance per rank and ignores nonsense. A bus client that publishes a well-formed
LoadReport or RankHello with a new instance id must not take a live rank over."""

from __future__ import annotations

import math

import pytest

from services.dispatcher.registry import RankRegistry
from services.gateway.liveness import Liveness
from shared.messages import LoadReport, RankHello
from tests.fakes import FakeClock

DEAD_AFTER = 1.0


def hello(instance: str, rank: int | None = None) -> RankHello:
    return RankHello(instance_id=instance, requested_dp_rank=rank)


def live_registry() -> RankRegistry:
    """Rank 0 held by "real", which said hello and reports."""
    reg = RankRegistry(dp_size=2, grace=10.0, dead_after=DEAD_AFTER)
    assert reg.assign(hello("real", 0), now=0).dp_rank == 0
    assert reg.admit(0, "real", now=0.1)
    return reg


# --- the dispatcher's rank registry --------------------------------------------------------------


def test_forged_report_on_a_live_rank_is_ignored_and_the_real_instance_keeps_it() -> None:
    reg = live_registry()
    assert not reg.admit(0, "forger", now=0.2)
    assert reg.refusal(0, "forger", now=0.2) == "the rank is held by instance real"
    assert reg.holder(0) == "real"
    assert reg.admit(0, "real", now=0.3)  # not retired: the forgery did not take the rank
    assert not reg.admit(0, "forger", now=0.3 + 0.9 * DEAD_AFTER)  # still live: silent < dead_after


def test_hello_for_a_live_held_rank_is_refused() -> None:
    reg = live_registry()
    answer = reg.assign(hello("forger", 0), now=0.5)
    assert answer.dp_rank is None and "held by live instance real" in answer.message
    assert reg.holder(0) == "real"
    # a hello without a rank gets a free one, never a held one
    assert reg.assign(hello("other"), now=0.5).dp_rank == 1
    assert reg.assign(hello("third"), now=0.5).dp_rank is None


def test_a_held_assignment_that_never_reported_is_kept_until_grace() -> None:
    reg = RankRegistry(dp_size=1, grace=10.0, dead_after=DEAD_AFTER)
    assert reg.assign(hello("loading", 0), now=0).dp_rank == 0  # confirmed, model still loading
    assert reg.assign(hello("forger", 0), now=5).dp_rank is None
    assert not reg.admit(0, "forger", now=5)
    assert reg.assign(hello("next", 0), now=10.5).dp_rank == 0  # "loading" never reported


@pytest.mark.parametrize("released", [False, True])
def test_after_the_holder_is_dead_a_new_hello_gets_the_rank(released: bool) -> None:
    reg = live_registry()
    if released:
        reg.release(0)  # the dispatcher expired it
        now = 0.2
    else:
        now = 0.1 + DEAD_AFTER + 0.01  # silent past dead_after, not yet expired by the dispatcher
    answer = reg.assign(hello("restarted", 0), now=now)
    assert (answer.dp_rank, answer.message) == (0, "confirmed")
    assert reg.admit(0, "restarted", now=now + 0.1)
    assert not reg.admit(0, "real", now=now + 0.2)  # the old one resumed: retired
    assert reg.refusal(0, "real", now=now + 0.2) == "the instance was replaced on this rank"


def test_restart_that_says_hello_first_is_accepted_once_the_old_instance_is_silent() -> None:
    reg = live_registry()
    assert reg.assign(hello("new", 0), now=0.5).dp_rank is None  # the old one reported 0.4 s ago
    assert not reg.admit(0, "new", now=0.6)  # reports before the hello succeeded are ignored
    answer = reg.assign(hello("new", 0), now=1.2)  # the scheduler asks again every second
    assert answer.dp_rank == 0
    assert reg.admit(0, "new", now=1.3)
    assert reg.assign(hello("new", 0), now=1.4).message == "already assigned"


def test_report_for_a_free_rank_claims_it_like_a_hello() -> None:
    """A report gets no more than a hello would: a never-held rank (a restarted dispatcher), or its
    last holder coming back after a freeze."""
    reg = RankRegistry(dp_size=2, grace=10.0, dead_after=DEAD_AFTER)
    assert reg.admit(1, "running", now=0)
    assert reg.holder(1) == "running"
    reg.release(1)
    assert reg.admit(1, "running", now=5)  # resumed after a freeze; nobody took the rank meanwhile
    assert not reg.admit(1, "forger", now=5.1)


@pytest.mark.parametrize("rank", [-1, 2, 999])
def test_ranks_outside_dp_size_are_never_held(rank: int) -> None:
    reg = RankRegistry(dp_size=2, grace=10.0, dead_after=DEAD_AFTER)
    assert not reg.admit(rank, "x", now=0)
    answer = reg.assign(hello("x", rank), now=0)
    assert answer.dp_rank is None and "outside [0, 2)" in answer.message
    assert reg.owners == {}


def test_hello_without_instance_id_is_refused() -> None:
    reg = RankRegistry(dp_size=2, grace=10.0)
    assert reg.assign(hello(""), now=0).dp_rank is None
    assert reg.owners == {}


# --- the gateway's liveness view -----------------------------------------------------------------


def load(rank: int, instance: str = "a", **kw: float) -> LoadReport:
    fields: dict[str, float] = dict(seq=1, timestamp=0.0, holding_tokens=0, num_running=0, num_waiting=0,
                                    kv_used=0, kv_total=10, cache_hit_rate=0.0)
    fields.update(kw)
    return LoadReport(dp_rank=rank, instance_id=instance, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [
        load(999),
        load(2),
        load(-1),
        load(0, num_running=-1),
        load(0, holding_tokens=-5),
        load(0, kv_used=11, kv_total=10),
        load(0, timestamp=math.nan),
        load(0, cache_hit_rate=math.nan),
        load(0, cache_hit_rate=1.5),
    ],
)
async def test_liveness_ignores_nonsense_and_out_of_range_reports(bad: LoadReport) -> None:
    forwarded: list[LoadReport] = []

    async def then(r: LoadReport) -> None:
        forwarded.append(r)

    live = Liveness(1.0, dp_size=2, clock=FakeClock(), then=then)
    await live.on_report(bad)
    assert live.live_ranks() == [] and forwarded == [] and live.ignored == 1
    good = load(1)
    await live.on_report(good)
    assert live.live_ranks() == [1] and forwarded == [good]


async def test_liveness_follows_the_live_instance_of_each_rank() -> None:
    clock = FakeClock()
    forwarded: list[LoadReport] = []

    async def then(r: LoadReport) -> None:
        forwarded.append(r)

    live = Liveness(1.0, dp_size=2, clock=clock, then=then)
    real = load(0, "real")
    await live.on_report(real)
    clock.now += 0.5
    await live.on_report(load(0, "forger", num_running=7))  # a live rank: ignored, not forwarded
    assert forwarded == [real] and live.instance[0] == "real"
    clock.now += 0.6  # "real" silent for 1.1 s > timeout: dead
    assert live.live_ranks() == []
    restarted = load(0, "restarted")
    await live.on_report(restarted)  # a restarted rank is followed once the old one is dead
    assert live.live_ranks() == [0] and forwarded == [real, restarted] and live.instance[0] == "restarted"
