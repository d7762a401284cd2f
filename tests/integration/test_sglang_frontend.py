"""SGLang's frontend language (`import sglang as sgl`, `RuntimeEndpoint`), unchanged, against a real
`dpserve serve` (tiny model): multi-turn `gen` with max_tokens and stop, chat roles, `select` scored
by batched prompt logprobs, `run_batch`, streaming with `text_iter`, and `gen` constrained by
`regex` / `gen_int` / `json_schema`. What the frontend produces is checked against plain `/generate`
calls, so a field it sends that dpserve drops or misreads shows up as a difference.

sglang is installed without its dependencies (Makefile: `pip install --no-deps sglang==...`); its
frontend needs only requests, tqdm, pydantic, pybase64 and ipython (pyproject's `test` extras)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import sglang as sgl

from tests.integration.client import generate

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(server_factory: Any) -> Iterator[Any]:
    server = server_factory("--request-timeout", "60")
    previous = sgl.global_config.default_backend
    sgl.set_default_backend(sgl.RuntimeEndpoint(server.url))
    yield server
    sgl.global_config.default_backend = previous


def direct(server: Any, text: str, max_new_tokens: int) -> dict[str, Any]:
    """The same greedy generation as a plain /generate body."""
    return generate(server.url, text=text, sampling_params=GREEDY | {"max_new_tokens": max_new_tokens})


@sgl.function
def two_turns(s: Any, question: str, stop_at: str) -> None:
    s += "Q: " + question + "\nA:"
    s += sgl.gen("first", max_tokens=8, temperature=0, ignore_eos=True)
    s += "\nQ: Why?\nA:"
    s += sgl.gen("second", max_tokens=16, temperature=0, ignore_eos=True, stop=stop_at)


def test_multi_turn_gen_with_max_tokens_and_stop(server: Any) -> None:
    prefix1 = "Q: Where is the city?\nA:"
    first = direct(server, prefix1, 8)
    prefix2 = prefix1 + first["text"] + "\nQ: Why?\nA:"
    second = direct(server, prefix2, 16)["text"]
    stop = second[len(second) // 2 : len(second) // 2 + 2]
    assert stop.strip() and first["meta_info"]["completion_tokens"] == 8, (first, second)

    # (not `stop=`: run() takes that keyword itself, as the default for every gen)
    state = two_turns.run(question="Where is the city?", stop_at=stop)
    assert state.error() is None
    assert state["first"] == first["text"]
    assert state.get_meta_info("first")["completion_tokens"] == 8
    assert state["second"] == second[: second.index(stop)]
    assert state.get_meta_info("second")["finish_reason"] == {"type": "stop", "matched": stop}
    assert state.text() == prefix2 + state["second"]


@sgl.function
def chat(s: Any, question: str) -> None:
    s += sgl.system("You are terse.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("reply", max_tokens=6, temperature=0, ignore_eos=True))


def test_chat_roles_render_through_the_default_template(server: Any) -> None:
    state = chat.run(question="Say a number.")
    assert state.error() is None
    assert state.messages() == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say a number."},
        {"role": "assistant", "content": state["reply"].strip()},  # SGLang strips a message
    ]
    roles = sgl.global_config.default_backend.get_chat_template().role_prefix_and_suffix
    prompt = "".join(roles[r][0] + c + roles[r][1] for r, c in (("system", "You are terse."), ("user", "Say a number.")))
    prompt += roles["assistant"][0]
    assert state.text() == prompt + state["reply"] + roles["assistant"][1]
    assert state["reply"] == direct(server, prompt, 6)["text"]


@sgl.function
def pick(s: Any, choices: list[str]) -> None:
    s += "The sky is"
    s += sgl.select("colour", choices=choices)


def scored(server: Any, prefix: str, choice: str, start: int) -> list[list[Any]]:
    """A choice's prompt logprobs from `start` on, healed as SGLang's select heals them."""
    out = generate(
        server.url, text=prefix + choice, sampling_params={"max_new_tokens": 0, "temperature": 0},
        return_logprob=True, return_text_in_logprobs=True, logprob_start_len=start,
    )
    entries = out["meta_info"]["input_token_logprobs"]
    return entries[1:] if prefix.endswith(entries[0][2]) else entries


def test_select_picks_the_best_scored_choice(server: Any) -> None:
    choices = [" blue", " green today", " red", " quite dark"]
    state = pick.run(choices=choices)
    assert state.error() is None
    meta = state.get_meta_info("colour")
    # SGLang's select scores from two tokens before the end of the prefix (token healing)
    prefix_tokens = generate(server.url, text="The sky is", sampling_params={"max_new_tokens": 0})
    start = prefix_tokens["meta_info"]["prompt_tokens"] - 2
    ours = [scored(server, "The sky is", c, start) for c in choices]
    scores = []
    for choice, entries, theirs, norm in zip(
        choices, ours, meta["input_token_logprobs"], meta["normalized_prompt_logprobs"], strict=True
    ):
        assert "".join(e[2] for e in entries).endswith(choice), entries
        assert [e[1:] for e in theirs] == [e[1:] for e in entries]
        assert [e[0] for e in theirs] == pytest.approx([e[0] for e in entries], abs=1e-3)
        scores.append(sum(e[0] for e in entries) / len(entries))
        assert norm == pytest.approx(scores[-1], abs=1e-3)
    assert state["colour"] in choices
    assert scores[choices.index(state["colour"])] >= max(scores) - 1e-3, (state["colour"], scores)


@sgl.function
def answer(s: Any, question: str) -> None:
    s += "Q: " + question + "\nA:"
    s += sgl.gen("answer", max_tokens=6, temperature=0, ignore_eos=True)


def test_run_batch_answers_each_state_as_alone(server: Any) -> None:
    questions = ["one", "two two", "three is more", "four", "five five five"]
    states = answer.run_batch([{"question": q} for q in questions], num_threads=4)
    assert [s.error() for s in states] == [None] * len(questions)
    expected = [direct(server, f"Q: {q}\nA:", 6)["text"] for q in questions]
    assert [s["answer"] for s in states] == expected


@sgl.function
def story(s: Any) -> None:
    s += "Once upon a time"
    s += sgl.gen("tale", max_tokens=12, temperature=0, ignore_eos=True)


def test_streaming_text_iter_yields_the_whole_text(server: Any) -> None:
    state = story.run(stream=True)
    chunks = list(state.text_iter())
    tale = direct(server, "Once upon a time", 12)["text"]
    assert "".join(chunks) == state.text() == "Once upon a time" + tale
    assert state["tale"] == tale
    assert state.get_meta_info("tale")["completion_tokens"] == 12


CODE = r"[A-Z]{2}-[0-9]{3}( (ok|fail))?"


@sgl.function
def code(s: Any, temperature: float) -> None:
    s += "The code is "
    s += sgl.gen("code", max_tokens=16, regex=CODE, temperature=temperature)


def test_regex_constrains_the_output(server: Any) -> None:
    # at most 11 characters, so the match always completes within max_tokens and then only EOS is allowed
    states = code.run_batch([{"temperature": t} for t in (0, 0.7, 1.0, 1.5)], num_threads=4)
    assert [s.error() for s in states] == [None] * 4
    for state in states:
        assert re.fullmatch(CODE, state["code"]), state["code"]
        assert state.get_meta_info("code")["finish_reason"]["type"] == "stop", state.get_meta_info("code")


@sgl.function
def typed(s: Any) -> None:
    s += "Age: " + sgl.gen_int("age", max_tokens=6) + "\n"
    # room for the longest tokenization of '{"colour": "blue"}' (the grammar ends the request)
    s += "Colour: " + sgl.gen("colour", max_tokens=64, json_schema=json.dumps(COLOUR))


COLOUR = {
    "type": "object", "properties": {"colour": {"enum": ["red", "blue"]}},
    "required": ["colour"], "additionalProperties": False,
}


def test_gen_int_and_json_schema(server: Any) -> None:
    state = typed.run(temperature=1.0)
    assert state.error() is None
    assert re.fullmatch(r"[-+]?[0-9]+", state["age"]), state["age"]
    assert json.loads(state["colour"])["colour"] in ("red", "blue")
