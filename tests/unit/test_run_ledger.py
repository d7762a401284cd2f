"""The scheduler leader's run ledger: what the dispatcher hears about the runs it sent."""

from __future__ import annotations

from services.scheduler.ledger import RunLedger
from shared.messages import FinishReason, SamplingParams, TokenizedRequest, TokenOutput


def _msg(rid: str, dispatch_id: int, first_seq: int = 0) -> TokenizedRequest:
    return TokenizedRequest(
        rid=rid, gateway_id="g", input_ids=[1], sampling=SamplingParams(), dispatch_id=dispatch_id, first_seq=first_seq
    )


def _out(rid: str, seq: int, finish: str | None = None) -> TokenOutput:
    return TokenOutput(
        rid=rid, gateway_id="g", seq=seq, ids=[], num_new=0, prompt_tokens=1, completion_tokens=0,
        finish=FinishReason(type=finish) if finish else None,
    )


def test_accepted_then_finished_per_run_of_a_resubmitted_rid() -> None:
    ledger = RunLedger()
    ledger.accept(_msg("a", 1))
    ledger.accept(_msg("a", 2, first_seq=1 << 32))  # the gateway's resubmission at a new epoch
    assert ledger.holds(_msg("a", 9, first_seq=1 << 32)) and not ledger.holds(_msg("a", 9, first_seq=5))
    assert ledger.take_report() == ([1, 2], [])
    # the original run ends (its seq is below the new epoch), then the resubmitted one
    assert ledger.publishable([_out("a", 3, "length")]) == [_out("a", 3, "length")]
    assert ledger.take_report() == ([], [1])
    ledger.publishable([_out("a", (1 << 32) + 4), _out("a", (1 << 32) + 5, "stop")])
    assert ledger.take_report() == ([], [2]) and ledger.held == {}


def test_refused_run_is_accepted_and_finished_at_once() -> None:
    ledger = RunLedger()
    ledger.refuse(_msg("r", 7))
    assert ledger.take_report() == ([7], [7]) and not ledger.holds(_msg("r", 7))


def test_fenced_abort_is_not_published_and_the_fence_is_bounded() -> None:
    ledger = RunLedger(max_fenced=2)
    ledger.accept(_msg("x", 1))
    ledger.fence("x")
    kept = ledger.publishable([_out("x", 0, "abort"), _out("y", 0, "abort"), _out("x", 1)])
    assert kept == [_out("y", 0, "abort"), _out("x", 1)]
    assert ledger.take_report() == ([1], [1])  # the dispatcher still hears the run ended
    ledger.fence("p")
    ledger.fence("q")
    assert not ledger.is_fenced("x") and ledger.is_fenced("p") and ledger.is_fenced("q")
