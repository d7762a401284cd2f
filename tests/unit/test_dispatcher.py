"""The load table and the load-balance policies, without a bus."""

from __future__ import annotations

import pytest

from services.dispatcher.loads import LoadTable
from services.dispatcher.policies import POLICIES, make_policy, minimum_tokens_load
from shared.messages import LoadReport, TokenizedRequest


def report(dp_rank: int, seq: int, holding: int = 0, accepted: list[int] | None = None, **kw: int) -> LoadReport:
    return LoadReport(
        dp_rank=dp_rank, seq=seq, timestamp=0.0, holding_tokens=holding, num_running=kw.get("running", 0),
        num_waiting=kw.get("waiting", 0), kv_used=0, kv_total=100, accepted=accepted or [], instance_id="a",
    )


def req(dispatch_id: int, n: int) -> TokenizedRequest:
    return TokenizedRequest(rid=f"r{dispatch_id}", gateway_id="g", input_ids=[1] * n, dispatch_id=dispatch_id)


def table_with(*holdings: int) -> LoadTable:
    table = LoadTable(dead_after=1.0)
    for rank, holding in enumerate(holdings):
        table.on_report(report(rank, 1, holding), now=0.0)
    return table


def test_in_flight_counts_until_accepted() -> None:
    table = table_with(0, 0)
    table.add_in_flight(0, req(1, 30), now=0.0)
    table.add_in_flight(0, req(2, 20), now=0.0)
    assert table.rank(0).in_flight_tokens == 50
    table.on_report(report(0, 2, holding=30, accepted=[1]), now=0.1)
    assert table.rank(0).in_flight_tokens == 20
    assert minimum_tokens_load(table.rank(0)) == 50


def test_stale_report_is_ignored() -> None:
    table = table_with(10)
    table.on_report(report(0, 5, holding=40), now=0.1)
    table.on_report(report(0, 4, holding=99), now=0.2)
    assert table.rank(0).holding_tokens == 40


def test_burst_between_reports_spreads_with_minimum_tokens() -> None:
    table = table_with(0, 0, 0)
    policy = make_policy("minimum_tokens")
    chosen = []
    for i in range(1, 7):  # no report arrives during the burst
        rank = policy.pick(req(i, 100), table.live_ranks())
        table.add_in_flight(rank.dp_rank, req(i, 100), now=0.0)
        chosen.append(rank.dp_rank)
    assert chosen == [0, 1, 2, 0, 1, 2]


def test_minimum_tokens_prefers_lightest_and_breaks_ties_by_rank() -> None:
    table = table_with(500, 100, 100)
    assert make_policy("minimum_tokens").pick(req(1, 10), table.live_ranks()).dp_rank == 1
    assert make_policy("total_tokens").pick(req(1, 10), table.live_ranks()).dp_rank == 1


def test_round_robin_skips_dead_ranks() -> None:
    table = table_with(0, 0, 0)
    policy = make_policy("round_robin")
    assert [policy.pick(req(i, 1), table.live_ranks()).dp_rank for i in range(4)] == [0, 1, 2, 0]
    table.on_report(report(0, 2), now=2.0)
    table.on_report(report(2, 2), now=2.0)
    died = table.expire(now=2.5)
    assert [r.dp_rank for r in died] == [1]
    assert [policy.pick(req(i, 1), table.live_ranks()).dp_rank for i in range(3)] == [2, 0, 2]
    assert table.on_report(report(1, 2), now=3.0)  # back to life
    assert [r.dp_rank for r in table.live_ranks()] == [0, 1, 2]


def test_total_requests_counts_in_flight() -> None:
    table = table_with(0, 0)
    table.on_report(report(0, 2, running=1), now=0.0)
    table.add_in_flight(1, req(1, 5), now=0.0)
    table.add_in_flight(1, req(2, 5), now=0.0)
    assert make_policy("shortest_queue").pick(req(3, 1), table.live_ranks()).dp_rank == 0


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_picks_a_live_rank(name: str) -> None:
    table = table_with(5, 7, 9)
    table.expire(now=5.0)
    table.on_report(report(2, 3), now=5.0)
    policy = make_policy(name, seed=0)
    assert {policy.pick(req(i, 3), table.live_ranks()).dp_rank for i in range(20)} == {2}


def test_unknown_policy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not implemented"):
        make_policy("least_surprise")


def test_rows_report_status_and_in_flight() -> None:
    table = table_with(10, 20)
    table.add_in_flight(1, req(1, 7), now=0.0)
    table.expire(now=5.0)
    table.on_report(report(1, 2, holding=20), now=5.0)
    rows = {r.dp_rank: r for r in table.rows(now=5.5)}
    assert rows[0].status == "dead" and rows[1].status == "live"
    assert rows[1].in_flight_tokens == 7 and rows[1].report_age_s == 0.5
