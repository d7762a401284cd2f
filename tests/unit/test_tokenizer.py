"""TextTokenizer (encode, BOS policy, chat template, limits) and the pure request validation."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from services.tokenizer.tokenize import TextTokenizer
from services.tokenizer.validate import validate
from shared.messages import ChatMessage, GenerateRequest, RequestError, SamplingParams, TokenizedRequest

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog",
    "héllo wörld — café naïve façade",
    "καλημέρα κόσμε",
    "你好，世界。中文文本",
    "emoji 😀🎉 and more text",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(bos_post_processor: bool = False) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos_post_processor:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    return tok


def write_model(
    path: Path,
    *,
    add_bos: bool | None = True,
    bos_post_processor: bool = False,
    chat_template: str | None = CHAT_TEMPLATE,
    max_positions: int = 2048,
) -> Path:
    tok = build_tokenizer(bos_post_processor)
    tok.save(str(path / "tokenizer.json"))
    cfg: dict[str, object] = {"bos_token": BOS, "eos_token": {"content": EOS, "special": True}}
    if add_bos is not None:
        cfg["add_bos_token"] = add_bos
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    config = {"max_position_embeddings": max_positions, "eos_token_id": tok.token_to_id(EOS)}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def tok(tmp_path: Path) -> TextTokenizer:
    return TextTokenizer(str(write_model(tmp_path, max_positions=64)))


# --- TextTokenizer ------------------------------------------------------------------------------


def test_loads_model_facts(tok: TextTokenizer) -> None:
    raw = tok.tokenizer
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    assert tok.bos_token_id == raw.token_to_id(BOS)
    assert tok.eos_token_ids == [raw.token_to_id(EOS)]
    assert tok.context_length == 64
    assert tok.add_bos


def test_context_length_override(tmp_path: Path) -> None:
    assert TextTokenizer(str(write_model(tmp_path)), context_length=100).context_length == 100
    assert TextTokenizer(str(tmp_path)).context_length == 2048


def test_encode_prepends_bos_once_and_roundtrips(tok: TextTokenizer) -> None:
    text = "héllo 世界 😀"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids) == text
    # a prompt that already starts with the BOS text (a rendered chat template) gets no second one
    again = tok.encode(BOS + text)
    assert again == ids


def test_no_bos_when_config_says_false(tmp_path: Path) -> None:
    tok = TextTokenizer(str(write_model(tmp_path, add_bos=False, bos_post_processor=True)))
    assert not tok.add_bos
    assert tok.encode("hello")[0] != tok.bos_token_id


def test_bos_from_post_processor_when_config_is_silent(tmp_path: Path) -> None:
    tok = TextTokenizer(str(write_model(tmp_path, add_bos=None, bos_post_processor=True)))
    assert tok.add_bos
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_no_bos_when_config_silent_and_no_post_processor(tmp_path: Path) -> None:
    tok = TextTokenizer(str(write_model(tmp_path, add_bos=None)))
    assert not tok.add_bos
    assert tok.decode(tok.encode("hello"), skip_special_tokens=False) == "hello"


def test_chat_template_renders_messages_and_generation_prompt(tok: TextTokenizer) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}]
    prompt = tok.apply_chat_template(messages)
    assert prompt == f"{BOS}<|system|>be brief{EOS}<|user|>héllo{EOS}<|assistant|>"
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith(f"héllo{EOS}")
    ids = tok.encode(prompt)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_chat_template_is_sandboxed(tmp_path: Path) -> None:
    evil = "{{ messages.append({'role': 'x'}) }}"
    tok = TextTokenizer(str(write_model(tmp_path, chat_template=evil)))
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_helpers(tmp_path: Path) -> None:
    template = (
        "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
        "{{ messages[0] | tojson }}"
    )
    tok = TextTokenizer(str(write_model(tmp_path, chat_template=template)))
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == '{"role": "user", "content": "é"}'
    with pytest.raises(jinja2.exceptions.TemplateError, match="one message only"):
        tok.apply_chat_template([{"role": "user", "content": "a"}] * 2)


def test_missing_chat_template(tmp_path: Path) -> None:
    tok = TextTokenizer(str(write_model(tmp_path, chat_template=None)))
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_file_wins(tmp_path: Path) -> None:
    write_model(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert TextTokenizer(str(tmp_path)).apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"


# --- validate ----------------------------------------------------------------------------------


def request(**kw: object) -> GenerateRequest:
    base: dict[str, object] = {"rid": "r1", "gateway_id": "g1"}
    return GenerateRequest(**(base | kw))  # type: ignore[arg-type]


def test_validate_text_ok(tok: TextTokenizer) -> None:
    req = request(
        text="hello world",
        sampling=SamplingParams(max_new_tokens=8, temperature=0.0),
        stream=True,
        routed_dp_rank=1,
        created=12.5,
    )
    out = validate(req, tok)
    assert isinstance(out, TokenizedRequest)
    assert out.input_ids == tok.encode("hello world")
    assert (out.rid, out.gateway_id, out.stream, out.routed_dp_rank, out.created) == (
        "r1",
        "g1",
        True,
        1,
        12.5,
    )
    assert out.sampling == req.sampling


def test_validate_input_ids_ok_and_untouched(tok: TextTokenizer) -> None:
    out = validate(request(input_ids=[5, 6, 7], sampling=SamplingParams(max_new_tokens=4)), tok)
    assert isinstance(out, TokenizedRequest) and out.input_ids == [5, 6, 7]


@pytest.mark.parametrize("bad", [-1, 10**6])
def test_validate_input_ids_out_of_vocab(tok: TextTokenizer, bad: int) -> None:
    out = validate(request(input_ids=[1, bad]), tok)
    assert isinstance(out, RequestError) and out.status == 400 and out.rid == "r1"
    assert str(bad) in out.message and str(tok.vocab_size) in out.message


def test_validate_vocab_boundary(tok: TextTokenizer) -> None:
    small = SamplingParams(max_new_tokens=1)
    assert isinstance(
        validate(request(input_ids=[tok.vocab_size - 1], sampling=small), tok), TokenizedRequest
    )
    assert isinstance(validate(request(input_ids=[tok.vocab_size], sampling=small), tok), RequestError)


@pytest.mark.parametrize("kw", [{"text": ""}, {"input_ids": []}])
def test_validate_empty_prompt(tok: TextTokenizer, kw: dict[str, object]) -> None:
    out = validate(request(**kw), tok)
    assert isinstance(out, RequestError) and out.message == "The input prompt is empty."


@pytest.mark.parametrize(
    "kw",
    [{}, {"text": "a", "input_ids": [1]}, {"text": "a", "messages": [ChatMessage(role="user", content="b")]}],
)
def test_validate_needs_exactly_one_input(tok: TextTokenizer, kw: dict[str, object]) -> None:
    out = validate(request(**kw), tok)
    assert isinstance(out, RequestError) and "Exactly one of text, input_ids or messages" in out.message


def test_validate_messages_render_the_chat_template(tok: TextTokenizer) -> None:
    messages = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="héllo")]
    out = validate(request(messages=messages, sampling=SamplingParams(max_new_tokens=4)), tok)
    assert isinstance(out, TokenizedRequest)
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}]
    )
    assert out.input_ids == tok.encode(prompt)
    assert out.input_ids.count(tok.bos_token_id) == 1


def test_validate_messages_errors(tmp_path: Path, tok: TextTokenizer) -> None:
    empty = validate(request(messages=[]), tok)
    assert isinstance(empty, RequestError) and empty.status == 400
    refusing = "{{ raise_exception('roles must alternate') }}"
    strict = TextTokenizer(str(write_model(tmp_path, chat_template=refusing)))
    out = validate(request(messages=[ChatMessage(role="user", content="x")]), strict)
    assert isinstance(out, RequestError) and out.status == 400 and "roles must alternate" in out.message


def test_validate_passes_logprob_options(tok: TextTokenizer) -> None:
    req = request(
        text="hi",
        sampling=SamplingParams(max_new_tokens=4),
        return_logprob=True,
        top_logprobs_num=3,
        logprob_start_len=0,
    )
    out = validate(req, tok)
    assert isinstance(out, TokenizedRequest)
    assert (out.return_logprob, out.top_logprobs_num, out.logprob_start_len) == (True, 3, 0)
    bad = validate(request(text="hi", top_logprobs_num=-1), tok)
    assert isinstance(bad, RequestError)


def test_validate_sampling_params(tok: TextTokenizer) -> None:
    out = validate(request(text="hi", sampling=SamplingParams(top_p=0.0)), tok)
    assert isinstance(out, RequestError) and out.message == "top_p must be in (0, 1]"


def test_validate_input_longer_than_context(tok: TextTokenizer) -> None:
    out = validate(request(input_ids=[5] * 65, sampling=SamplingParams(max_new_tokens=0)), tok)
    assert isinstance(out, RequestError)
    assert out.message == "The input (65 tokens) is longer than the model's context length (64 tokens)."


def test_validate_total_exceeds_context(tok: TextTokenizer) -> None:
    out = validate(request(input_ids=[5] * 60, sampling=SamplingParams(max_new_tokens=10)), tok)
    assert isinstance(out, RequestError) and out.status == 400
    assert out.message.startswith(
        "Requested token count exceeds the model's maximum context length of 64 tokens. "
        "You requested a total of 70 tokens: 60 tokens from the input messages and 10 tokens "
        "for the completion."
    )


def test_validate_exactly_at_context_is_ok(tok: TextTokenizer) -> None:
    assert isinstance(
        validate(request(input_ids=[5] * 54, sampling=SamplingParams(max_new_tokens=10)), tok),
        TokenizedRequest,
    )
    assert isinstance(
        validate(request(input_ids=[5] * 64, sampling=SamplingParams(max_new_tokens=0)), tok),
        TokenizedRequest,
    )


def test_validate_counts_bos_in_length(tok: TextTokenizer) -> None:
    text = "hello world"
    n = len(tok.encode(text))  # BOS included
    ok = validate(request(text=text, sampling=SamplingParams(max_new_tokens=64 - n)), tok)
    over = validate(request(text=text, sampling=SamplingParams(max_new_tokens=65 - n)), tok)
    assert isinstance(ok, TokenizedRequest) and isinstance(over, RequestError)
    assert f"{n} tokens from the input messages" in over.message


# --- the project's tiny checkpoint (conftest's `tiny_model`) ---------------------------------


def test_tiny_model_facts(tiny_model: Path) -> None:
    tok = TextTokenizer(str(tiny_model))
    raw = tok.tokenizer
    assert not tok.add_bos  # its tokenizer_config says add_bos_token: false
    assert tok.eos_token_ids == sorted({raw.token_to_id("<|end_of_text|>"), raw.token_to_id("<|im_end|>")})
    assert (
        tok.context_length == json.loads((tiny_model / "config.json").read_text())["max_position_embeddings"]
    )
    text = "héllo 世界 😀"
    assert tok.decode(tok.encode(text)) == text


def test_tiny_model_matches_transformers(tiny_model: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_model))
    tok = TextTokenizer(str(tiny_model))
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Grüße, 世界"}]},
    ]
    for gen in (True, False):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert tok.apply_chat_template(messages, add_generation_prompt=gen) == expected
    for text in ("plain text", "Καλημέρα 😀 <|im_start|>user"):
        assert tok.encode(text) == hf(text)["input_ids"]
