"""Text <-> token ids for one model directory: the tokenizer, BOS policy, chat template, limits.

Pure (no bus): the tokenizer service, the scheduler and the OpenAI layer share it.

BOS policy (explicit): `add_bos` is tokenizer_config's `add_bos_token` when the key is present,
otherwise whether the tokenizer's post-processor puts the BOS token first. Text is always encoded
with `add_special_tokens=False` and the BOS id is then prepended by hand, unless the ids already
start with it (a chat template usually renders `bos_token` itself), so a prompt never gets two.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from shared.messages import MODEL_SAMPLING_DEFAULTS


class TextTokenizer:
    def __init__(self, model_path: str, context_length: int = 0) -> None:
        """`context_length` > 0 overrides config.json's `max_position_embeddings`."""
        self.model_path = model_path
        self.tokenizer = Tokenizer.from_file(os.path.join(model_path, "tokenizer.json"))
        self.config = _read_json(os.path.join(model_path, "config.json"))
        self.tokenizer_config = _read_json(os.path.join(model_path, "tokenizer_config.json"))
        self.generation_config = _read_json(os.path.join(model_path, "generation_config.json"))
        # every id the tokenizer knows, added tokens included; valid prompt ids are [0, vocab_size)
        self.vocab_size: int = self.tokenizer.get_vocab_size(with_added_tokens=True)

        self.bos_token = _token_content(self.tokenizer_config.get("bos_token"))
        self.eos_token = _token_content(self.tokenizer_config.get("eos_token"))
        self.bos_token_id = self._token_id(self.bos_token)
        self.eos_token_ids: list[int] = self._eos_ids()
        self.add_bos: bool = self._add_bos()
        self.context_length: int = context_length or self._model_context_length()
        self.chat_template: str | None = self._chat_template_source()
        self._template: jinja2.Template | None = None
        self.sampling_defaults: dict[str, float | int] = self._sampling_defaults()

    # --- text -> ids ------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # --- chat -------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Renders the model's chat template in a sandbox (templates are data, not code).

        Extra kwargs (`tools`, `documents`, ...) reach the template as variables.
        """
        if self._template is None:
            if self.chat_template is None:
                raise ValueError(f"the model at {self.model_path} has no chat template")
            self._template = _jinja_env().from_string(self.chat_template)
        special = {
            k: _token_content(self.tokenizer_config.get(k))
            for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        variables = {k: v for k, v in special.items() if v is not None} | kwargs
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )

    # --- loading ----------------------------------------------------------------------------

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    def _eos_ids(self) -> list[int]:
        """Union of config.json / generation_config.json `eos_token_id` and the eos_token's id."""
        ids: set[int] = set()
        for value in (self.config.get("eos_token_id"), self.generation_config.get("eos_token_id")):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
        eos = self._token_id(self.eos_token)
        if eos is not None:
            ids.add(eos)
        return sorted(ids)

    def _sampling_defaults(self) -> dict[str, float | int]:
        """generation_config.json's temperature / top_p / top_k / min_p / repetition_penalty, for
        requests that leave them unset (as SGLang's `--sampling-defaults model`); HF's top_k 0
        (disabled) is our -1."""
        out: dict[str, float | int] = {}
        for key in MODEL_SAMPLING_DEFAULTS:
            value = self.generation_config.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            out[key] = (int(value) or -1) if key == "top_k" else float(value)
        return out

    def _add_bos(self) -> bool:
        if self.bos_token_id is None:
            return False
        explicit = self.tokenizer_config.get("add_bos_token")
        if explicit is not None:
            return bool(explicit)
        with_special = self.tokenizer.encode("a", add_special_tokens=True).ids
        without = self.tokenizer.encode("a", add_special_tokens=False).ids
        return bool(with_special) and with_special[0] == self.bos_token_id and with_special[:1] != without[:1]

    def _model_context_length(self) -> int:
        for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"):
            value = self.config.get(key)
            if isinstance(value, int) and value > 0:
                return value
        raise ValueError(f"no context length in {self.model_path}/config.json; pass --context-length")

    def _chat_template_source(self) -> str | None:
        path = os.path.join(self.model_path, "chat_template.jinja")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
        template = self.tokenizer_config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_content(value: object) -> str | None:
    """tokenizer_config stores special tokens as a string or as a serialized AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
