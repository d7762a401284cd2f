"""IncrementalDecoder (stateless deltas, stop trimming) and the per-gateway batch grouping."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from services.detokenizer.batch import detokenize_batch
from services.detokenizer.incremental import IncrementalDecoder, byte_alphabet, incomplete_tail, trim_at_stop
from shared.messages import DETOK_CONTEXT, FinishReason, RequestError, TextOutput, TokenBatch, TokenOutput

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog",
    "héllo wörld — café naïve façade",
    "καλημέρα κόσμε",
    "你好，世界。中文文本",
    "emoji 😀🎉 and more text",
]
TEXTS = [
    "café déjà vu, naïve façade — Ångström",
    "Καλημέρα κόσμε! Ψυχή ωραία",
    "你好，世界。我们在测试中文字符的增量解码",
    "emoji 😀🎉👩‍👩‍👧 flags 🇫🇷🇯🇵 and skin 👍🏽",
    "mixed: abc é 中 😀 ∑ 𝔘𝔫𝔦 ü\nnew line\ttab ﷽ ok",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def decoder(tokenizer: Tokenizer) -> IncrementalDecoder:
    return IncrementalDecoder(tokenizer)


def stream(decoder: IncrementalDecoder, ids: list[int], sizes: list[int], skip: bool = True) -> list[str]:
    """Deltas the way the scheduler sends steps: DETOK_CONTEXT earlier ids + the new ones."""
    out: list[str] = []
    pos = 0
    for i, n in enumerate(sizes):
        start = max(0, pos - DETOK_CONTEXT)
        out.append(decoder.delta(ids[start : pos + n], n, skip, final=i == len(sizes) - 1))
        pos += n
    assert pos == len(ids)
    return out


def random_sizes(rng: random.Random, total: int) -> list[int]:
    sizes: list[int] = []
    while sum(sizes) < total:
        sizes.append(min(rng.randint(1, 5), total - sum(sizes)))
    return sizes


# --- pieces -------------------------------------------------------------------------------------


def test_byte_alphabet_is_gpt2s() -> None:
    table = byte_alphabet()
    assert len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())


@pytest.mark.parametrize(
    ("data", "tail"),
    [
        (b"", 0),
        (b"abc", 0),
        ("é".encode(), 0),
        ("é".encode()[:1], 1),
        ("中".encode()[:2], 2),
        ("😀".encode()[:3], 3),
        (b"a" + "😀".encode()[:1], 1),
        ("😀".encode(), 0),
        (b"\x80\x80\x80", 0),  # lone continuations: invalid, not waited for
        (b"\xff", 0),
    ],
)
def test_incomplete_tail(data: bytes, tail: int) -> None:
    assert incomplete_tail(data) == tail


def test_table_matches_decode_per_token(tokenizer: Tokenizer, decoder: IncrementalDecoder) -> None:
    assert decoder.exact
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        assert decoder.to_bytes(ids).decode() == tokenizer.decode(ids) == text


def test_multibyte_chars_span_several_tokens(tokenizer: Tokenizer) -> None:
    """The fixture's premise: its small vocabulary splits CJK and emoji into byte tokens."""
    assert len(tokenizer.encode("😀").ids) >= 2
    assert len(tokenizer.encode("𝔘").ids) == 4


# --- the stateless invariant ----------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_concatenated_deltas_equal_decode(
    tokenizer: Tokenizer, decoder: IncrementalDecoder, text: str
) -> None:
    ids = tokenizer.encode(text).ids
    rng = random.Random(text)
    for _ in range(50):
        sizes = random_sizes(rng, len(ids))
        deltas = stream(decoder, ids, sizes)
        assert "".join(deltas) == tokenizer.decode(ids) == text
        assert all("\ufffd" not in d for d in deltas)  # never a half character


def test_one_token_per_step_on_byte_tokens(tokenizer: Tokenizer, decoder: IncrementalDecoder) -> None:
    """Every byte its own token: a 4-byte char arrives over 4 steps and comes out on the last."""
    alphabet = byte_alphabet()
    text = "a𝔘é中😀z"
    ids = [tokenizer.token_to_id(alphabet[b]) for b in text.encode()]
    deltas = stream(decoder, ids, [1] * len(ids))
    assert "".join(deltas) == text
    assert deltas[:5] == ["a", "", "", "", "𝔘"]


def test_held_back_bytes_are_emitted_once_completed(
    tokenizer: Tokenizer, decoder: IncrementalDecoder
) -> None:
    alphabet = byte_alphabet()
    ids = [tokenizer.token_to_id(alphabet[b]) for b in "x中".encode()]  # x, E4, B8, AD
    assert decoder.delta(ids[:2], 2) == "x"  # E4 held back
    assert decoder.delta(ids[:3], 1) == ""  # E4 B8 still incomplete
    assert decoder.delta(ids[:4], 1) == "中"  # context carries E4 B8
    assert decoder.delta(ids[:4], 2) == "中"  # the same with two new tokens


def test_final_flushes_incomplete_bytes(tokenizer: Tokenizer, decoder: IncrementalDecoder) -> None:
    alphabet = byte_alphabet()
    ids = [tokenizer.token_to_id(alphabet[b]) for b in b"ok\xe4\xb8"]
    assert decoder.delta(ids, 4) == "ok"
    assert decoder.delta(ids, 4, final=True) == "ok\ufffd" == tokenizer.decode(ids)
    # finishing with no new tokens still flushes what the previous step held back
    assert decoder.delta(ids, 0, final=True) == "\ufffd"
    assert decoder.delta(ids, 0) == ""


def test_num_new_out_of_range(decoder: IncrementalDecoder) -> None:
    with pytest.raises(ValueError):
        decoder.delta([1, 2], 3)


def test_skip_special_tokens(tokenizer: Tokenizer, decoder: IncrementalDecoder) -> None:
    eos, bos = tokenizer.token_to_id(EOS), tokenizer.token_to_id(BOS)
    ids = [bos, *tokenizer.encode("héllo 中文").ids, eos]
    assert decoder.is_special(eos) and not decoder.is_special(ids[1])
    assert "".join(stream(decoder, ids, [2] * (len(ids) // 2) + [1] * (len(ids) % 2))) == "héllo 中文"
    kept = "".join(stream(decoder, ids, [1] * len(ids), skip=False))
    assert kept == tokenizer.decode(ids, skip_special_tokens=False) == f"{BOS}héllo 中文{EOS}"
    assert decoder.delta([eos], 1) == ""


def test_unknown_ids_contribute_nothing(tokenizer: Tokenizer, decoder: IncrementalDecoder) -> None:
    ids = [*tokenizer.encode("ab").ids, 10**6]
    assert decoder.delta(ids, len(ids), final=True) == tokenizer.decode(ids) == "ab"


def test_loads_from_path(tokenizer: Tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    dec = IncrementalDecoder(tmp_path / "tokenizer.json")
    ids = tokenizer.encode(TEXTS[4]).ids
    assert "".join(stream(dec, ids, [3] * (len(ids) // 3) + [len(ids) % 3] * bool(len(ids) % 3))) == TEXTS[4]


# --- full_text ----------------------------------------------------------------------------------


def test_full_text_trims_at_earliest_stop(tokenizer: Tokenizer, decoder: IncrementalDecoder) -> None:
    ids = tokenizer.encode("one. two! three? four").ids
    assert decoder.full_text(ids) == "one. two! three? four"
    assert decoder.full_text(ids, stop=["?", "!"]) == "one. two"
    assert decoder.full_text(ids, stop=["three"]) == "one. two! "
    assert decoder.full_text(ids, stop=["absent"]) == "one. two! three? four"
    eos = tokenizer.token_to_id(EOS)
    assert decoder.full_text([*ids, eos], skip_special_tokens=False).endswith(EOS)


# --- batch --------------------------------------------------------------------------------------


def token_output(
    rid: str, gateway: str, ids: list[int], num_new: int, seq: int = 0, **kw: object
) -> TokenOutput:
    return TokenOutput(
        rid=rid,
        gateway_id=gateway,
        seq=seq,
        ids=ids,
        num_new=num_new,
        prompt_tokens=7,
        completion_tokens=num_new,
        **kw,  # type: ignore[arg-type]
    )


def test_batch_groups_by_gateway_in_order(tokenizer: Tokenizer, decoder: IncrementalDecoder) -> None:
    a, b, c = (tokenizer.encode(t).ids for t in ("hello", "world", "café"))
    batch = TokenBatch(
        dp_rank=0,
        outputs=[
            token_output("r1", "g1", a, len(a), seq=3, cached_tokens=2),
            token_output("r2", "g2", b, len(b)),
            token_output("r3", "g1", c, len(c)),
        ],
    )
    out = detokenize_batch(batch, decoder)
    assert set(out) == {"g1", "g2"}
    g1 = out["g1"].outputs
    assert [o.rid for o in g1] == ["r1", "r3"]
    first = g1[0]
    assert isinstance(first, TextOutput)
    assert (first.text, first.seq, first.new_ids, first.prompt_tokens, first.cached_tokens) == (
        "hello",
        3,
        a,
        7,
        2,
    )
    assert first.finish is None and first.full_text is None
    assert isinstance(out["g2"].outputs[0], TextOutput) and out["g2"].outputs[0].text == "world"


def test_batch_new_ids_exclude_context(tokenizer: Tokenizer, decoder: IncrementalDecoder) -> None:
    ids = tokenizer.encode("hello world").ids
    assert len(ids) >= 3
    [item] = detokenize_batch(TokenBatch(dp_rank=0, outputs=[token_output("r", "g", ids, 1)]), decoder)[
        "g"
    ].outputs
    assert isinstance(item, TextOutput) and item.new_ids == ids[-1:]
    [empty] = detokenize_batch(TokenBatch(dp_rank=0, outputs=[token_output("r", "g", ids, 0)]), decoder)[
        "g"
    ].outputs
    assert isinstance(empty, TextOutput) and empty.new_ids == [] and empty.text == ""


def steps(
    decoder: IncrementalDecoder, all_ids: list[int], sizes: list[int], finish: FinishReason, **kw: object
) -> tuple[str, TextOutput]:
    """The request's steps through detokenize_batch the way the scheduler sends them (the last one
    finished): the concatenated texts and the last TextOutput."""
    texts: list[str] = []
    pos = 0
    for seq, n in enumerate(sizes):
        last = seq == len(sizes) - 1
        out = token_output(
            "r",
            "g",
            all_ids[max(0, pos - DETOK_CONTEXT) : pos + n],
            n,
            seq=seq,
            finish=finish if last else None,
            all_ids=all_ids if last else None,
            **kw,
        )
        [item] = detokenize_batch(TokenBatch(dp_rank=0, outputs=[out]), decoder)["g"].outputs
        assert isinstance(item, TextOutput)
        assert item.new_ids == all_ids[pos : pos + n]  # the ids keep the stop token either way
        texts.append(item.text)
        pos += n
    assert pos == len(all_ids)
    return "".join(texts), item


def test_batch_final_step_full_text_and_stop(tokenizer: Tokenizer, decoder: IncrementalDecoder) -> None:
    end = len(tokenizer.encode("the answer is 42. END").ids)
    all_ids = tokenizer.encode("the answer is 42. END tail").ids[:end]
    sizes = [3] * ((end - 3) // 3)
    sizes.append(end - sum(sizes))
    # the stop string "END" arrives in the last step: the streamed text stops before it
    finish = FinishReason(type="stop", matched="END")
    text, last = steps(decoder, all_ids, sizes, finish, stop=["END"])
    assert text == last.full_text == "the answer is 42. "
    assert last.finish == finish


def test_batch_final_step_without_stop(tokenizer: Tokenizer, decoder: IncrementalDecoder) -> None:
    ids = tokenizer.encode("done 中").ids
    out = token_output(
        "r", "g", ids, len(ids), finish=FinishReason(type="length", length=len(ids)), all_ids=ids
    )
    [item] = detokenize_batch(TokenBatch(dp_rank=0, outputs=[out]), decoder)["g"].outputs
    assert isinstance(item, TextOutput) and item.text == item.full_text == "done 中"


def test_batch_failure_is_isolated(tokenizer: Tokenizer, decoder: IncrementalDecoder) -> None:
    ok = tokenizer.encode("fine").ids
    batch = TokenBatch(
        dp_rank=1,
        outputs=[
            token_output("bad", "g1", [1], 5),  # num_new > len(ids): raises inside
            token_output("good", "g1", ok, len(ok)),
        ],
    )
    items = detokenize_batch(batch, decoder)["g1"].outputs
    assert items[0] == RequestError(rid="bad", message="detokenization failed", status=500)
    assert isinstance(items[1], TextOutput) and items[1].text == "fine"


def test_invariant_on_tiny_model(tiny_model) -> None:  # type: ignore[no-untyped-def]
    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    dec = IncrementalDecoder(tiny_model / "tokenizer.json")
    assert dec.exact
    rng = random.Random(0)
    for text in TEXTS:
        ids = tok.encode(text).ids
        for _ in range(20):
            assert "".join(stream(dec, ids, random_sizes(rng, len(ids)))) == tok.decode(ids) == text


# --- stop trimming and no_stop_trim ---------------------------------------------------------------


def size_cases(n: int) -> list[list[int]]:
    """One step (not streamed), one token per step, and a random split."""
    return [[n], [1] * n, random_sizes(random.Random(n), n)]


def test_trim_at_stop() -> None:
    assert trim_at_stop("hello world", ["wor"]) == "hello "
    assert trim_at_stop("hello world", ["wor"], keep_stop=True) == "hello wor"  # "ld" came past it
    # several stop strings: cut before the one that starts first, or after the one that ends first
    assert trim_at_stop("xabcd", ["abc", "b"]) == "x"
    assert trim_at_stop("xabcd", ["abc", "b"], keep_stop=True) == "xab"
    assert trim_at_stop("xabcd", ["zz"], keep_stop=True) == trim_at_stop("xabcd", ["zz"]) == "xabcd"


@pytest.mark.parametrize("no_stop_trim", [False, True])
def test_stop_string_kept_with_no_stop_trim(
    tokenizer: Tokenizer, decoder: IncrementalDecoder, no_stop_trim: bool
) -> None:
    finish = FinishReason(type="stop", matched="wor")
    ids = tokenizer.encode("hello world").ids  # ... " w", "orld": the last token ends the stop string
    expect = "hello wor" if no_stop_trim else "hello "
    for sizes in size_cases(len(ids)):
        text, last = steps(decoder, ids, sizes, finish, stop=["wor"], no_stop_trim=no_stop_trim)
        assert last.full_text == expect, sizes
        if no_stop_trim:  # kept whole: the deltas end where full_text does
            assert text == expect, sizes
        else:  # the deltas may have sent where the stop string began; the gateway holds that back
            assert text.startswith(expect) and len(text) - len(expect) < len("wor"), sizes


@pytest.mark.parametrize("no_stop_trim", [False, True])
def test_stop_token_text_trimmed_unless_no_stop_trim(
    tokenizer: Tokenizer, decoder: IncrementalDecoder, no_stop_trim: bool
) -> None:
    """SGLang's trim_matched_stop: a matched stop token (stop_token_ids or EOS) adds no text unless
    no_stop_trim; a special one adds none anyway while skip_special_tokens."""
    ids = tokenizer.encode("hello world").ids
    stop_id = ids[-1]  # "orld", an ordinary token
    finish = FinishReason(type="stop", matched=stop_id)
    for sizes in size_cases(len(ids)):
        text, last = steps(decoder, ids, sizes, finish, no_stop_trim=no_stop_trim)
        assert text == last.full_text == ("hello world" if no_stop_trim else "hello w"), sizes
    eos = tokenizer.token_to_id(EOS)
    with_eos = [*ids, eos]
    eos_finish = FinishReason(type="stop", matched=eos)
    for sizes in size_cases(len(with_eos)):
        text, last = steps(decoder, with_eos, sizes, eos_finish, no_stop_trim=no_stop_trim)
        assert text == last.full_text == "hello world", sizes
        text, last = steps(
            decoder, with_eos, sizes, eos_finish, no_stop_trim=no_stop_trim, skip_special_tokens=False
        )
        assert text == last.full_text == ("hello world" + EOS if no_stop_trim else "hello world"), sizes


def test_stop_token_trim_flushes_held_back_bytes(tokenizer: Tokenizer, decoder: IncrementalDecoder) -> None:
    """The stop token ends the request mid-character: the held-back bytes come out as decode() has them."""
    alphabet = byte_alphabet()
    ids = [tokenizer.token_to_id(alphabet[b]) for b in b"ok\xe4\xb8"] + tokenizer.encode("x").ids
    finish = FinishReason(type="stop", matched=ids[-1])
    for sizes in size_cases(len(ids)):
        text, last = steps(decoder, ids, sizes, finish)
        assert text == last.full_text == tokenizer.decode(ids[:-1]) == "ok\ufffd", sizes
