"""What each `--backend` sends, and what one event of its stream says.

Every backend streams server-sent events ending with `data: [DONE]`; `runner.py` reads and times
the stream for all of them. A backend only builds the request body and turns one decoded event into
a `Delta`: the text it adds, how many output tokens it adds (0: no output, e.g. a role-only chat
chunk or the final usage chunk) and the server's count of output tokens so far, if it gives one.

- `sglang`: `POST /generate`; events carry the cumulative `text` and `output_ids`, so a delta may add
  several tokens.
- `openai`, `openai-chat`: `POST /v1/completions`, `/v1/chat/completions`. As SGLang's
  bench_serving, every chunk with non-empty text counts as one token for timing; the output length
  is the usage chunk's `completion_tokens` (`stream_options.include_usage`), else the requested one
  (`ignore_eos` makes them equal).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from services.bench.datasets import BenchRequest


@dataclass(frozen=True)
class Delta:
    text: str = ""
    tokens: int = 0
    output_len: int | None = None


@dataclass(frozen=True)
class Backend(ABC):
    model: str = "default"
    ignore_eos: bool = True

    path: ClassVar[str]
    needs_text: ClassVar[bool] = False  # the prompt must be text, not token ids

    @abstractmethod
    def body(self, req: BenchRequest) -> dict[str, Any]: ...

    @abstractmethod
    def delta(self, event: dict[str, Any], text: str, tokens: int) -> Delta:
        """What `event` adds to a stream that has produced `text` and `tokens` so far."""

    def rid(self, event: dict[str, Any]) -> str:
        """The server's id of the request, if `event` carries it ("" otherwise)."""
        return ""


class SGLangGenerate(Backend):
    path = "/generate"

    def body(self, req: BenchRequest) -> dict[str, Any]:
        prompt = {"input_ids": req.input_ids} if req.input_ids is not None else {"text": req.text}
        params = {"max_new_tokens": req.output_len, "temperature": 0.0, "ignore_eos": self.ignore_eos}
        return prompt | {"sampling_params": params, "stream": True}

    def rid(self, event: dict[str, Any]) -> str:
        return str(event.get("meta_info", {}).get("id") or "")

    def delta(self, event: dict[str, Any], text: str, tokens: int) -> Delta:
        counted = event.get("meta_info", {}).get("completion_tokens")
        n = len(event.get("output_ids") or []) or counted or 0
        full = event.get("text", text)  # cumulative
        return Delta(full[len(text) :], max(0, n - tokens), max(n, tokens) if counted is None else counted)


class OpenAICompletions(Backend):
    path = "/v1/completions"

    def prompt(self, req: BenchRequest) -> dict[str, Any]:
        return {"prompt": req.input_ids if req.input_ids is not None else req.text}

    def choice_text(self, choice: dict[str, Any]) -> str:
        return choice.get("text") or ""

    def body(self, req: BenchRequest) -> dict[str, Any]:
        return {
            "model": self.model,
            **self.prompt(req),
            "max_tokens": req.output_len,
            "temperature": 0.0,
            "ignore_eos": self.ignore_eos,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    def delta(self, event: dict[str, Any], text: str, tokens: int) -> Delta:
        choices = event.get("choices") or []
        new = self.choice_text(choices[0]) if choices else ""
        return Delta(new, 1 if new else 0, (event.get("usage") or {}).get("completion_tokens"))


class OpenAIChat(OpenAICompletions):
    path = "/v1/chat/completions"
    needs_text = True

    def prompt(self, req: BenchRequest) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": req.text}]}

    def choice_text(self, choice: dict[str, Any]) -> str:
        return (choice.get("delta") or {}).get("content") or ""


BACKENDS: dict[str, type[Backend]] = {
    "sglang": SGLangGenerate,
    "openai": OpenAICompletions,
    "openai-chat": OpenAIChat,
}
