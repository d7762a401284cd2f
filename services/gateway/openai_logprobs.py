"""OpenAI's two logprobs shapes, built from what a RequestStream accumulated.

The scheduler sends (logprob, token_id) pairs per output token and, with `top_logprobs_num`, the
k best pairs per position, most likely first; the detokenizer sends each named id's bytes (the
gateway has no tokenizer). A token's text is its bytes decoded with errors="replace", so a token
holding part of a UTF-8 character shows U+FFFD while `bytes` stays exact.

Both shapes are built over a range [start, end) of output positions, so a streamed chunk carries
the entries of the tokens it is the first to report, and the whole response is the range [0, n).
"""

from __future__ import annotations

from typing import Any

from services.gateway.streams import RequestStream

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat's `top_logprobs`; also applied to completions


def num_entries(stream: RequestStream) -> int:
    """Output positions with a logprob so far."""
    return len(stream.logprobs.get("output_token_logprobs", ()))


class _Tokens:
    def __init__(self, stream: RequestStream) -> None:
        self.stream = stream
        self.chosen: list[Any] = stream.logprobs.get("output_token_logprobs", [])
        self.top: list[Any] = stream.logprobs.get("output_top_logprobs", [])

    def raw(self, token_id: int) -> bytes:
        return self.stream.token_bytes.get(token_id, b"")

    def text(self, token_id: int) -> str:
        return self.raw(token_id).decode("utf-8", errors="replace")

    def top_row(self, i: int) -> list[Any]:
        return (self.top[i] or []) if i < len(self.top) else []


def chat_logprobs(stream: RequestStream, start: int, end: int) -> dict[str, Any]:
    """Chat's `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`."""
    toks = _Tokens(stream)
    content = []
    for i in range(start, end):
        lp, token_id = toks.chosen[i]
        content.append(
            {
                "token": toks.text(token_id),
                "logprob": lp,
                "bytes": list(toks.raw(token_id)),
                "top_logprobs": [
                    {"token": toks.text(t), "logprob": v, "bytes": list(toks.raw(t))} for v, t in toks.top_row(i)
                ],
            }
        )
    return {"content": content}


def prompt_text(stream: RequestStream) -> str:
    """A prompt's text from its tokens' bytes (needs its input logprobs from position 0)."""
    ids = [t for _, t in stream.logprobs.get("input_token_logprobs", ())]
    return b"".join(stream.token_bytes.get(t, b"") for t in ids).decode("utf-8", errors="replace")


def completion_logprobs(stream: RequestStream, start: int, end: int, echo: bool = False) -> dict[str, Any]:
    """Legacy completions' `{tokens, token_logprobs, top_logprobs, text_offset}` for output
    positions [start, end); offsets count characters of the concatenated token texts. With `echo`
    the prompt's entries come first, in the object that starts at position 0 (the first prompt
    token has no logprob: null, as its top_logprobs), and offsets count from the prompt's start."""
    toks = _Tokens(stream)
    prompt: list[Any] = stream.logprobs.get("input_token_logprobs", []) if echo else []
    prompt_top: list[Any] = stream.logprobs.get("input_top_logprobs", []) if echo else []
    offset = sum(len(toks.text(t)) for _, t in prompt) + sum(len(toks.text(t)) for _, t in toks.chosen[:start])
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []

    def add(lp: float | None, token_id: int, top_row: list[Any] | None) -> None:
        nonlocal offset
        text = toks.text(token_id)
        tokens.append(text)
        token_logprobs.append(lp)
        if top_row is None:
            tops.append(None)
        else:
            row: dict[str, float] = {}
            for v, t in top_row:
                row.setdefault(toks.text(t), v)  # two ids with one text: the likelier one stays
            tops.append(row)
        offsets.append(offset)
        offset += len(text)

    if prompt and start == 0:
        offset = 0
        for i, (lp, token_id) in enumerate(prompt):
            add(lp, token_id, None if lp is None else (prompt_top[i] if i < len(prompt_top) else None) or [])
    for i in range(start, end):
        lp, token_id = toks.chosen[i]
        add(lp, token_id, toks.top_row(i))
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
