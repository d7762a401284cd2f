"""Stateless incremental detokenization: the text that one step's new tokens complete.

A step carries `ids` = up to DETOK_CONTEXT earlier ids + `num_new` new ids. The earlier ids only
serve to recover the bytes of a UTF-8 character that began before this step and that the previous
step therefore held back. Invariant (valid UTF-8 output, byte-level tokenizers): concatenating
`delta` over every step, the last one with `final=True`, equals `tokenizer.decode(all_ids)`.

Exactness: for a ByteLevel decoder the id -> bytes table mirrors `tokenizers`' own decode (a token
string maps char by char through GPT-2's byte alphabet, or, if any char is outside it, as its UTF-8
bytes). Other decoders (Metaspace, ByteFallback, ...) fall back to per-id `decode([id])`, which
loses context-dependent spaces and splits byte-fallback characters: approximate only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import cache

from tokenizers import Tokenizer


@cache
def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map byte -> printable char: printable Latin-1 bytes map to themselves,
    the other 68 bytes to U+0100, U+0101, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def incomplete_tail(data: bytes) -> int:
    """Length (0..3) of the trailing bytes of `data` that start a UTF-8 character not yet complete.

    Scans back over at most 3 continuation bytes to a lead byte whose sequence is longer than what
    follows it. Invalid tails (lone continuations, bytes 0xF8..0xFF) count as complete: they
    decode to U+FFFD now rather than wait forever.
    """
    for back in range(1, min(3, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 == 0x80:  # continuation byte: keep looking for the lead
            continue
        if 0xC0 <= b <= 0xDF:
            need = 2
        elif 0xE0 <= b <= 0xEF:
            need = 3
        elif 0xF0 <= b <= 0xF7:
            need = 4
        else:  # ASCII or an invalid lead
            return 0
        return back if need > back else 0
    return 0


class IncrementalDecoder:
    def __init__(self, tokenizer: str | os.PathLike[str] | Tokenizer) -> None:
        """`tokenizer`: a tokenizers.Tokenizer, or the path of its tokenizer.json."""
        self.tokenizer = (
            tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(os.fspath(tokenizer))
        )
        decoder = json.loads(self.tokenizer.to_str()).get("decoder") or {}
        self.exact: bool = decoder.get("type") == "ByteLevel"
        size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        added = self.tokenizer.get_added_tokens_decoder()
        size = max([size, *(i + 1 for i in added)])
        # invariant: _bytes[i] is what token i contributes to decode(); ids outside it contribute
        # nothing (tokenizers skips unknown ids too)
        self._bytes: list[bytes] = [self._token_bytes(i) for i in range(size)]
        self._special: frozenset[int] = frozenset(i for i, t in added.items() if t.special)

    def _token_bytes(self, i: int) -> bytes:
        if not self.exact:
            return self.tokenizer.decode([i], skip_special_tokens=False).encode()
        token = self.tokenizer.id_to_token(i)
        if token is None:
            return b""
        inverse = _inverse_alphabet()
        try:
            return bytes(inverse[c] for c in token)
        except KeyError:  # a char outside the byte alphabet (e.g. an added token): raw UTF-8
            return token.encode()

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def to_bytes(self, ids: Sequence[int], skip_special_tokens: bool = True) -> bytes:
        table, size, special = self._bytes, len(self._bytes), self._special
        return b"".join(table[i] for i in ids if 0 <= i < size and not (skip_special_tokens and i in special))

    def delta(
        self, ids: Sequence[int], num_new: int, skip_special_tokens: bool = True, final: bool = False
    ) -> str:
        """The text completed by the last `num_new` of `ids`; the ids before them are context.

        The incomplete character at the end of the context (held back by the previous step) is
        prepended; an incomplete character at the end is held back unless `final`.
        """
        if not 0 <= num_new <= len(ids):
            raise ValueError(f"num_new={num_new} outside [0, {len(ids)}]")
        split = len(ids) - num_new
        context = self.to_bytes(ids[:split], skip_special_tokens)
        carry = context[len(context) - incomplete_tail(context) :]
        data = carry + self.to_bytes(ids[split:], skip_special_tokens)
        if not final:
            data = data[: len(data) - incomplete_tail(data)]
        return data.decode("utf-8", errors="replace")

    def streamed_text(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """What the deltas of a request whose generated ids are `ids` have emitted so far
        (the trailing incomplete character held back)."""
        data = self.to_bytes(ids, skip_special_tokens)
        return data[: len(data) - incomplete_tail(data)].decode("utf-8", errors="replace")

    def full_text(
        self,
        all_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        keep_stop: bool = False,
    ) -> str:
        """decode(all_ids), cut at the first stop string (see `trim_at_stop`)."""
        text = self.tokenizer.decode(list(all_ids), skip_special_tokens=skip_special_tokens)
        return trim_at_stop(text, stop, keep_stop)


def trim_at_stop(text: str, stop: Sequence[str], keep_stop: bool = False) -> str:
    """`text` cut before the earliest occurrence of any stop string, or, with `keep_stop` (SGLang's
    no_stop_trim), after the occurrence that ends first: the stop string stays, what the last token
    decoded past it goes."""
    found = [(i, i + len(s)) for s in stop if s and (i := text.find(s)) >= 0]
    if not found:
        return text
    return text[: min(end for _, end in found)] if keep_stop else text[: min(start for start, _ in found)]


@cache
def _inverse_alphabet() -> dict[str, int]:
    return {c: b for b, c in byte_alphabet().items()}
