"""Resume of already-generated output (migration): the scheduler side and the gateway stream."""

from __future__ import annotations

import pytest

from services.gateway.streams import RequestStream
from services.scheduler.request import Req
from shared.messages import FinishReason, SamplingParams, TextOutput, TokenizedRequest
from tests.unit.test_engine import Rig, run


def _msg(rid: str, resume: list[int], first_seq: int = 0, n: int = 24) -> TokenizedRequest:
    sampling = SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=n)
    return TokenizedRequest(rid=rid, gateway_id="g", input_ids=[5, 17, 99, 230, 7], sampling=sampling,
                            stream=True, resume_output_ids=resume, first_seq=first_seq)


@pytest.mark.parametrize("cut", [0, 1, 9, 23, 24])
def test_resumed_request_continues_with_the_same_greedy_output(rig: Rig, cut: int) -> None:
    full = run(rig.engine(), [Req.from_msg(_msg("a", []))])["a"].all_ids
    assert full is not None and len(full) == 24
    outs = []
    engine = rig.engine()
    req = Req.from_msg(_msg("b", full[:cut], first_seq=3 << 32))
    engine.add(req)
    while engine.has_work or engine.finished_early:
        outs += engine.step().outputs
    engine.assert_idle_invariants()
    assert outs[-1].all_ids == full  # the final output carries every id, resumed ones included
    new = [t for o in outs for t in o.ids[len(o.ids) - o.num_new :]]
    assert new == full[cut:]  # only what was not generated before is sent
    assert [o.seq for o in outs] == [(3 << 32) + i for i in range(len(outs))]
    assert outs[-1].completion_tokens == 24


def test_resume_over_its_own_cached_output_keeps_the_hit_rate_a_rate(rig: Rig) -> None:
    """A request migrated to a rank that cached its earlier output matches more than its prompt;
    the rank's cache_hit_rate must stay in [0, 1] (the dispatcher drops reports outside it, and a
    rank whose reports are all dropped counts as dead)."""
    engine = rig.engine()
    full = run(engine, [Req.from_msg(_msg("a", []))])["a"].all_ids
    assert full is not None
    run(engine, [Req.from_msg(_msg("b", full[:20], first_seq=1 << 32))])
    assert engine.cache.hit_tokens > 5 + 5  # the resume matched past the prompt, into the output
    assert 0 < engine.cache.hit_rate <= 1


def _out(seq: int, text: str, ids: list[int], final: bool = False) -> TextOutput:
    return TextOutput(rid="r", seq=seq, text=text, new_ids=ids, prompt_tokens=1, completion_tokens=0,
                      finish=FinishReason(type="length") if final else None, full_text="abcd" if final else None)


def test_stream_switches_epoch_and_ignores_the_earlier_run() -> None:
    s = RequestStream("r")
    s.feed(_out(0, "a", [1]))
    s.feed(_out(2, "x", [9]))  # seq 1 was lost: waits
    s.begin_resume()
    s.feed(_out(1, "b", [2]))  # late, while resuming: not applied yet
    assert s.output_ids == [1]
    s.switch_epoch(1 << 32)
    s.feed(_out(1, "b", [2]))  # the earlier run's step after the switch: a duplicate now
    s.feed(_out((1 << 32) + 1, "cd", [3, 4], final=True))
    assert not s.done
    s.feed(_out(1 << 32, "b", [2]))
    assert s.done and s.output_ids == [1, 2, 3, 4] and s.text == "abcd"


def test_cancelled_resume_applies_what_waited() -> None:
    s = RequestStream("r")
    s.begin_resume()
    s.feed(_out(0, "a", [1]))
    assert s.output_ids == []
    s.cancel_resume()
    assert s.output_ids == [1] and s.released == "a"
