"""The model's text -> OpenAI tool calls. Pure.

Two readings (which one: services/gateway/tool_choice.py):
- `TaggedReader` (tool_choice auto): free text with Hermes / Qwen blocks
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as services/tokenizer/tools.py asks
  for. A block whose JSON does not parse, or that names no offered function, stays text.
- `ForcedReader` (required / named): the whole output is the JSON array of
  `{"name", "arguments"}` that the grammar engine forced; no tags.

Both read incrementally: `feed(delta)` returns the content that may be streamed and the calls
completed so far, `finish()` the rest. A whole response feeds its text once, so streamed and
whole answers agree. The content is the text outside valid blocks, less the whitespace that
adjoins a block; text with no valid block comes out unchanged. While streaming, `TaggedReader`
holds back a tail that may start a block (a prefix of `<tool_call>` and the whitespace before
it), and a started block until it closes. A block the output leaves open is read at `finish`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.tokenizer.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ParsedCall:
    id: str
    name: str
    arguments: str  # JSON text of an object

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Read:
    """What a reader made of the text fed so far: content to send, and calls completed."""

    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)

    def __add__(self, other: Read) -> Read:
        return Read(self.content + other.content, self.calls + other.calls)


def call_of(value: Any, names: frozenset[str], new_id: Callable[[], str]) -> ParsedCall | None:
    """`{"name": <offered>, "arguments": {...}}` as a ParsedCall (arguments may be missing, or JSON
    text of an object); None for anything else."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    args = value.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(new_id(), value["name"], json.dumps(args, ensure_ascii=False))


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


class TaggedReader:
    """Reads `<tool_call>` blocks out of free text (see the module docstring)."""

    def __init__(self, names: frozenset[str], new_id: Callable[[], str] = new_call_id) -> None:
        self.names, self.new_id = names, new_id
        self.pending = ""  # text fed but not yet decided: a possible block start, or a block's body
        self.in_block = False  # `pending` is the body of an open block
        self.ws_before = ""  # the whitespace before the open block: dropped if the block is a call
        self.after_block = False  # nothing but whitespace since the last call: drop it

    def feed(self, delta: str) -> Read:
        self.pending += delta
        out = Read()
        while True:
            if self.in_block:
                end = self.pending.find(TOOL_CALL_CLOSE)
                if end < 0:
                    return out
                body, self.pending = self.pending[:end], self.pending[end + len(TOOL_CALL_CLOSE) :]
                out += self._close(body, TOOL_CALL_CLOSE)
                continue
            start = self.pending.find(TOOL_CALL_OPEN)
            if start < 0:
                keep = _possible_start(self.pending)
                out += self._text(self.pending[: len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep :]
                return out
            before = self.pending[:start]
            text = before.rstrip()
            out += self._text(text)
            self.ws_before, self.in_block = before[len(text) :], True
            self.pending = self.pending[start + len(TOOL_CALL_OPEN) :]

    def finish(self) -> Read:
        rest, self.pending = self.pending, ""
        if self.in_block:
            return self._close(rest, "")
        return self._text(rest)

    def _close(self, body: str, close: str) -> Read:
        self.in_block = False
        call = call_of(_json(body.strip()), self.names, self.new_id)
        if call is None:
            return self._text(self.ws_before + TOOL_CALL_OPEN + body + close)
        self.after_block = True
        return Read(calls=[call])

    def _text(self, text: str) -> Read:
        if self.after_block:
            text = text.lstrip()
            self.after_block = not text
        return Read(content=text)


def _possible_start(text: str) -> int:
    """The length of `text`'s tail that may begin a block: whitespace, then a proper prefix of
    the opening tag (either may be empty)."""
    prefix = next((k for k in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1)
                   if text.endswith(TOOL_CALL_OPEN[:k])), 0)
    head = text[: len(text) - prefix]
    return prefix + len(head) - len(head.rstrip())


class ForcedReader:
    """Reads the JSON array of calls a forced tool_choice makes the output (see the module
    docstring); text that is not one (a generation cut short) stays content."""

    def __init__(self, names: frozenset[str], new_id: Callable[[], str] = new_call_id) -> None:
        self.names, self.new_id = names, new_id
        self.text = ""

    def feed(self, delta: str) -> Read:
        self.text += delta
        return Read()

    def finish(self) -> Read:
        value = _json(self.text)
        calls = [call_of(v, self.names, self.new_id) for v in value] if isinstance(value, list) else []
        if not calls or any(c is None for c in calls):
            return Read(content=self.text)
        return Read(calls=[c for c in calls if c is not None])


Reader = TaggedReader | ForcedReader


def reader_for(read: str | None, names: frozenset[str], new_id: Callable[[], str] = new_call_id) -> Reader | None:
    """The reader a ToolPlan's `read` names; None: the output is plain text."""
    if read == "tagged":
        return TaggedReader(names, new_id)
    if read == "forced":
        return ForcedReader(names, new_id)
    return None


def read_whole(reader: Reader, text: str) -> Read:
    return reader.feed(text) + reader.finish()
