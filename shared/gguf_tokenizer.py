"""The tokenizer a GGUF file describes (tokenizer.ggml.*), as a `tokenizers` tokenizer and the
tokenizer_config.json transformers reads beside it.

Two vocabularies llama.cpp writes: "gpt2" (byte-level BPE, merges listed, text split first by
the regexes llama.cpp names in tokenizer.ggml.pre) and "llama" (sentencepiece BPE with byte
fallback; merges recovered from the scores when the file lists none). Control tokens become
special tokens, user-defined ones plain added tokens; BOS is prepended where the file (or
llama.cpp's default for the vocabulary) says so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("gguf")


class Fields(Protocol):
    """The file's key/value metadata (shared.gguf reads it): `get` a field or a default,
    `require` one or raise ValueError."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def require(self, key: str) -> Any: ...


# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4

# tokenizer.ggml.pre -> the split regexes llama.cpp applies before byte-level BPE (llama-vocab.cpp).
# None: GPT-2's own regex (ByteLevel's built-in). A list: applied in order, each isolating matches.
_GPT2 = None
_DIGITS_THEN_GPT2 = [r"\p{N}"]
_LLAMA3 = [
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
]
_QWEN2 = [
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
]
PRE_TOKENIZER_SPLITS: dict[str, list[str] | None] = {
    "default": _GPT2,
    "gpt2": _GPT2,
    "gpt-2": _GPT2,
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "command-r": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2,
    "exaone": _DIGITS_THEN_GPT2,
    "minerva-7b": _DIGITS_THEN_GPT2,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "falcon3": _LLAMA3,
    "pixtral": _LLAMA3,
    "dbrx": _LLAMA3,
    "smaug-bpe": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
}


# --- tokenizer --------------------------------------------------------------------------------


def build_tokenizer(meta: Fields, path: Path) -> tuple[Any, dict[str, Any]]:
    """The `tokenizers` tokenizer and tokenizer_config.json the file's tokenizer.ggml.* describe."""
    from tokenizers import AddedToken, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = list(meta.require("tokenizer.ggml.tokens"))
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    if kind == "gpt2":
        tok = _byte_level_bpe(meta, tokens, path)
        add_bos_default = False
    elif kind == "llama":
        tok = _sentencepiece_bpe(meta, tokens, path)
        add_bos_default = True  # llama.cpp's default for sentencepiece vocabularies
    else:
        raise ValueError(
            f"{path}: tokenizer model {kind!r} is not supported (only 'gpt2', byte-level BPE, "
            "and 'llama', sentencepiece BPE)"
        )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True) if k == TOKEN_CONTROL]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types, strict=True) if k == TOKEN_USER_DEFINED]
    )

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    if add_bos:
        assert bos is not None
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tokens.index(bos))]
        )
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "clean_up_tokenization_spaces": False,
    }
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    return tok, config


def _byte_level_bpe(meta: Fields, tokens: list[str], path: Path) -> Any:
    """GPT-2 style: tokens are spelled in the byte-to-unicode alphabet, merges are listed."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    pairs = []
    for m in meta.get("tokenizer.ggml.merges") or []:
        a, sep, b = m.partition(" ")
        if not sep:
            raise ValueError(f"{path}: malformed merge {m!r}")
        pairs.append((a, b))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        log.warning("%s: unknown tokenizer.ggml.pre %r; splitting text with GPT-2's regex", path, pre)
    splits = PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        regex_gpt2 = splits is _DIGITS_THEN_GPT2  # the digit split comes first, GPT-2's regex after
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex_gpt2)]
        )
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(meta: Fields, tokens: list[str], path: Path) -> Any:
    """Sentencepiece BPE (Llama 1/2, Mistral): `▁` for spaces, `<0xXX>` byte fallback, and merges
    (rarely in the file) recovered from the vocabulary: every split of a token into two tokens,
    best-scored result first."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    vocab = {t: i for i, t in enumerate(tokens)}
    listed = meta.get("tokenizer.ggml.merges")
    if listed:
        pairs = [tuple(m.split(" ", 1)) for m in listed]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ValueError(f"{path}: a sentencepiece vocabulary needs tokenizer.ggml.scores or merges")
        pairs = _merges_from_scores(tokens, [float(x) for x in scores], vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, dropout=None, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, score in zip(tokens, scores, strict=True):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked += [(score, len(left), len(right), left, right) for left, right in splits]
    # best score first, then longer left / right pieces; ties keep vocabulary order (stable sort)
    ranked.sort(key=lambda r: (r[0], r[1], r[2]), reverse=True)
    return [(left, right) for _, _, _, left, right in ranked]
