"""SGLang's `/generate` over HTTP: the request body and the response body.

A body is read as SGLang's `GenerateReqInput` reads it:
- `null` means the field's default (null fields are dropped before decoding); a mistyped field is
  a 400 naming its JSON path (e.g. "Expected `int | null`, got `str` - at
  `$.sampling_params.max_new_tokens`");
- unknown top-level fields are ignored, as SGLang does, and returned in `GenerateCall.ignored`
  (the gateway counts them); an unknown sampling parameter is a 400 naming it;
- fields of features dpserve lacks (`REFUSED`, `REFUSED_SAMPLING`) are a 400 naming the feature
  when set to anything but their default; fields without effect here (`model`, `log_metrics`,
  `priority`, `stream_interval`, ...) are accepted.

A body becomes `batch_size × n` GenerateRequests, item i's n samples consecutive (index
`i * n + j`, SGLang's order): `text` as a list or `input_ids` as a list of lists is a batch, and
`sampling_params.n` (or a top-level `n`) > 1 turns even one prompt into a batch. A batch is
answered as a JSON list in that order (streamed: each event carries its `index`). Rids: a batch
item gets `rid[i]` (a list) or `{rid}_{index}` (a string); with n > 1 and a list, `{rid[i]}_{j}`.
`sampling_seed` is SGLang's name for `seed`; every sample of an item uses the same seed, as in
SGLang. `data_parallel_rank` is SGLang's deprecated alias of `routed_dp_rank`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import msgspec
from msgspec import Struct

from shared.messages import FinishReason, GenerateRequest, SamplingParams


class InvalidRequest(ValueError):
    """A request the client must fix: answered with 400 and this message."""


class GenerateSamplingParams(Struct, kw_only=True, forbid_unknown_fields=True):
    """SGLang's `sampling_params`. None: not given, SamplingParams' default applies."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    seed: int | None = None  # dpserve's name
    sampling_seed: int | None = None  # SGLang's name for the same
    n: int | None = None  # samples per prompt (a batch)
    logit_bias: dict[str, float] | None = None  # token id (a string, as in JSON) -> added to its logit
    # without effect here: a fast tokenizer ignores spaces_between_special_tokens (SGLang's too);
    # every step is streamed
    spaces_between_special_tokens: bool | None = None
    stream_interval: int | None = None
    # not implemented: refused unless unset (REFUSED_SAMPLING)
    no_stop_trim: bool | None = None
    stop_regex: str | list[str] | None = None
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    custom_params: dict[str, Any] | None = None

    def to_sampling(self) -> SamplingParams:
        if self.seed is not None and self.sampling_seed is not None and self.seed != self.sampling_seed:
            raise InvalidRequest("`seed` and `sampling_seed` differ; send one of them")
        given = {k: getattr(self, k) for k in _PLAIN_SAMPLING if getattr(self, k) is not None}
        if self.stop is not None:
            given["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        if self.logit_bias:
            if not all(k.strip().isdigit() for k in self.logit_bias):
                raise InvalidRequest("invalid sampling_params: logit_bias keys must be token ids")
            given["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
        seed = self.seed if self.seed is not None else self.sampling_seed
        params = SamplingParams(**given, seed=seed)
        problem = params.problem()
        if problem is not None:
            raise InvalidRequest(f"invalid sampling_params: {problem}")
        return params


_PLAIN_SAMPLING = (
    "max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
    "presence_penalty", "repetition_penalty", "stop_token_ids", "ignore_eos", "skip_special_tokens",
)

# sampling parameter -> the feature it asks for, which dpserve does not implement (yet)
REFUSED_SAMPLING = {
    "no_stop_trim": "no_stop_trim (keeping the stop string in the output)",
    "stop_regex": "stop_regex (regular-expression stop conditions)",
    "regex": "constrained decoding (regex)",
    "json_schema": "constrained decoding (json_schema)",
    "ebnf": "constrained decoding (ebnf)",
    "structural_tag": "constrained decoding (structural_tag)",
    "custom_params": "custom logit processors (custom_params)",
}

_MULTIMODAL = (
    "image_data", "video_data", "audio_data", "mm_hashes", "mm_content_hashes", "use_audio_in_video",
    "video_config", "modalities", "max_dynamic_patch", "min_dynamic_patch", "image_max_dynamic_patch",
    "video_max_dynamic_patch", "images_config", "need_wait_for_mm_inputs", "num_items_assigned", "encoder_urls",
)
_DISAGGREGATION = (
    "bootstrap_host", "bootstrap_port", "bootstrap_room", "bootstrap_pair_key", "decode_tp_size",
    "disagg_prefill_dp_rank",
)

# top-level field -> the feature it asks for, which dpserve does not implement (yet)
REFUSED = {
    "input_embeds": "input_embeds (embeddings as the prompt)",
    **{f: f"multimodal input ({f})" for f in _MULTIMODAL},
    "token_ids_logprob": "token_ids_logprob (logprobs of given token ids)",
    "return_sampling_mask": "return_sampling_mask",
    "return_flat_raw_top_logprobs": "flat raw top logprobs",
    "return_flat_raw_top_logprobs_b64": "flat raw top logprobs",
    "return_hidden_states": "returning hidden states",
    "return_routed_experts": "returning routed experts",
    "routed_experts_start_len": "returning routed experts",
    "return_indexer_topk": "returning indexer top-k",
    "session_params": "sessions (session_params)",
    "lora_path": "LoRA adapters (lora_path)",
    "lora_id": "LoRA adapters (lora_id)",
    "custom_logit_processor": "custom logit processors",
    "positional_embed_overrides": "positional embedding overrides",
    **{f: f"prefill-decode disaggregation ({f})" for f in _DISAGGREGATION},
    "background": "background requests",
    "require_reasoning": "reasoning controls (require_reasoning)",
    "max_thinking_tokens": "reasoning controls (max_thinking_tokens)",
    "return_bytes": "image generation (return_bytes)",
    "return_entropy": "returning entropy",
    "return_prompt_token_ids": "return_prompt_token_ids",
    "multi_item_delimiter_indices": "multi-item scoring",
    "cache_salt": "cache isolation (cache_salt)",
    "extra_key": "cache isolation (extra_key)",
    "http_worker_ipc": "http_worker_ipc (internal to SGLang)",
}


class GenerateBody(Struct, kw_only=True):
    """SGLang's `GenerateReqInput`, as far as a client sends it over HTTP."""

    text: str | list[str] | None = None
    input_ids: list[int | list[int]] | None = None  # ids, or a batch of id lists
    sampling_params: GenerateSamplingParams | list[GenerateSamplingParams] | None = None
    rid: str | list[str] | None = None
    stream: bool = False
    return_logprob: bool | list[bool] | None = None
    top_logprobs_num: int | list[int] | None = None
    logprob_start_len: int | list[int] | None = None
    return_text_in_logprobs: bool = False
    routed_dp_rank: int | None = None
    data_parallel_rank: int | None = None  # SGLang's deprecated alias of routed_dp_rank
    n: int | None = None  # not SGLang's: the same as sampling_params.n
    # without effect here
    model: str | None = None  # the SGLang Model Gateway sends it
    log_metrics: bool = True
    session_id: str | None = None
    conversation_id: str | None = None
    routing_key: str | None = None
    priority: int | None = None
    no_logs: bool = False
    custom_labels: dict[str, str] | None = None
    external_trace_header: dict[str, Any] | None = None
    received_time: float | None = None
    kv_router_hint: dict[str, Any] | None = None
    # not implemented: refused unless unset (REFUSED)
    input_embeds: Any = None
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    mm_hashes: Any = None
    mm_content_hashes: Any = None
    use_audio_in_video: Any = None
    video_config: Any = None
    modalities: Any = None
    max_dynamic_patch: Any = None
    min_dynamic_patch: Any = None
    image_max_dynamic_patch: Any = None
    video_max_dynamic_patch: Any = None
    images_config: Any = None
    need_wait_for_mm_inputs: Any = None
    num_items_assigned: Any = None
    encoder_urls: Any = None
    token_ids_logprob: Any = None
    return_sampling_mask: Any = None
    return_flat_raw_top_logprobs: Any = None
    return_flat_raw_top_logprobs_b64: Any = None
    return_hidden_states: Any = None
    return_routed_experts: Any = None
    routed_experts_start_len: Any = None
    return_indexer_topk: Any = None
    session_params: Any = None
    lora_path: Any = None
    lora_id: Any = None
    custom_logit_processor: Any = None
    positional_embed_overrides: Any = None
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None
    bootstrap_pair_key: Any = None
    decode_tp_size: Any = None
    disagg_prefill_dp_rank: Any = None
    background: Any = None
    require_reasoning: Any = None
    max_thinking_tokens: Any = None
    return_bytes: Any = None
    return_entropy: Any = None
    return_prompt_token_ids: Any = None
    multi_item_delimiter_indices: Any = None
    cache_salt: Any = None
    extra_key: Any = None
    http_worker_ipc: Any = None


KNOWN_FIELDS = frozenset(GenerateBody.__struct_fields__)
assert set(REFUSED) <= KNOWN_FIELDS and set(REFUSED_SAMPLING) <= set(GenerateSamplingParams.__struct_fields__)


@dataclass(frozen=True)
class GenerateCall:
    """A valid `/generate` body, as the response side needs it."""

    reqs: list[GenerateRequest]  # item index k is reqs[k]
    batch: bool  # answered as a list (streamed: events tagged by index), else as one object
    stream: bool
    text_in_logprobs: bool  # logprob entries carry the token's text third
    ignored: list[str]  # unknown top-level fields, ignored


def parse_generate(body: bytes, gateway_id: str, created: float) -> GenerateRequest:
    """The bus message for a single (not batch) `/generate` body; raises InvalidRequest."""
    call = parse_generate_call(body, gateway_id, created)
    if call.batch:
        raise InvalidRequest("a batch request where one request was expected")
    return call.reqs[0]


def parse_generate_call(body: bytes, gateway_id: str, created: float, max_requests: int = 1024) -> GenerateCall:
    """The bus messages of a `/generate` body, at most `max_requests` of them; raises InvalidRequest."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.ValidationError as e:
        raise InvalidRequest(f"invalid request: {e}") from None
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequest("body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    ignored = sorted(k for k in data if k not in KNOWN_FIELDS)
    known = _without_nulls({k: v for k, v in data.items() if k in KNOWN_FIELDS})
    raw_params = known.get("sampling_params")
    if isinstance(raw_params, dict):
        known["sampling_params"] = _without_nulls(raw_params)
    elif isinstance(raw_params, list):
        known["sampling_params"] = [_without_nulls(p) if isinstance(p, dict) else p for p in raw_params]
    try:
        req = msgspec.convert(known, GenerateBody)
    except msgspec.ValidationError as e:
        raise InvalidRequest(f"invalid request: {e}") from None
    _refuse_unsupported(req)
    prompts = _prompts(req)
    params = _sampling_list(req.sampling_params, len(prompts))
    n = _samples_per_prompt(req, params)
    batch = isinstance(req.text, list) or (req.input_ids is not None and _is_batch(req.input_ids)) or n > 1
    if len(prompts) * n > max_requests:
        raise InvalidRequest(
            f"the request asks for {len(prompts) * n} generations; this server runs at most {max_requests} at once"
        )
    routed = _routed_dp_rank(req)
    rids = _rids(req.rid, len(prompts), n, batch)
    logprob = _per_item(req.return_logprob, False, "return_logprob", len(prompts), n)
    top = _per_item(req.top_logprobs_num, 0, "top_logprobs_num", len(prompts), n)
    start = _per_item(req.logprob_start_len, -1, "logprob_start_len", len(prompts), n)
    if any(t < 0 for t in top) or any(s < -1 for s in start):
        raise InvalidRequest("`top_logprobs_num` must be >= 0 and `logprob_start_len` >= -1")
    sampling = [p.to_sampling() for p in params]
    reqs = []
    for i, prompt in enumerate(prompts):
        for j in range(n):
            reqs.append(check_encodable(GenerateRequest(
                rid=rids[i * n + j],
                gateway_id=gateway_id,
                text=prompt if isinstance(prompt, str) else None,
                input_ids=prompt if isinstance(prompt, list) else None,
                sampling=sampling[i],
                stream=req.stream,
                routed_dp_rank=routed,
                created=created,
                return_logprob=logprob[i],
                top_logprobs_num=top[i],
                logprob_start_len=start[i],
            )))
    return GenerateCall(reqs, batch, req.stream, req.return_text_in_logprobs, ignored)


def _without_nulls(obj: dict[str, Any]) -> dict[str, Any]:
    """`null` means the default: the body's and sampling_params' null fields, dropped."""
    return {k: v for k, v in obj.items() if v is not None}


def _refuse_unsupported(req: GenerateBody) -> None:
    """400 naming a feature dpserve lacks, when a field that asks for it is set (not null, false,
    0 or empty)."""
    for name, feature in REFUSED.items():
        if getattr(req, name):
            raise InvalidRequest(f"{feature} is not supported by this server (`{name}`)")
    params = req.sampling_params
    for p in params if isinstance(params, list) else [params] if params is not None else []:
        for name, feature in REFUSED_SAMPLING.items():
            if getattr(p, name):
                raise InvalidRequest(f"{feature} is not supported by this server (`sampling_params.{name}`)")


def _is_batch(ids: list[int | list[int]]) -> bool:
    return bool(ids) and isinstance(ids[0], list)


def _prompts(req: GenerateBody) -> list[str | list[int]]:
    """The prompts, one per batch item (a single request is a batch of one)."""
    if (req.text is None) == (req.input_ids is None):
        raise InvalidRequest("exactly one of `text` and `input_ids` is required")
    if req.text is not None:
        prompts: list[str | list[int]] = [req.text] if isinstance(req.text, str) else list(req.text)
    else:
        ids = req.input_ids or []
        if not ids:
            raise InvalidRequest("`input_ids` must not be empty")
        if _is_batch(ids):
            if not all(isinstance(x, list) for x in ids):
                raise InvalidRequest("`input_ids` mixes token ids and id lists")
            prompts = [list(x) for x in ids if isinstance(x, list)]
        elif any(isinstance(x, list) for x in ids):
            raise InvalidRequest("`input_ids` mixes token ids and id lists")
        else:
            prompts = [[x for x in ids if isinstance(x, int)]]
        if any(not p for p in prompts):
            raise InvalidRequest("`input_ids` must not be empty")
        if any(i < 0 for p in prompts for i in p):
            raise InvalidRequest("`input_ids` must be >= 0")
    if not prompts:
        raise InvalidRequest("a batch must not be empty")
    return prompts


def _sampling_list(
    params: GenerateSamplingParams | list[GenerateSamplingParams] | None, size: int
) -> list[GenerateSamplingParams]:
    if params is None:
        return [GenerateSamplingParams()] * size
    if not isinstance(params, list):
        return [params] * size
    if len(params) != size:
        raise InvalidRequest(f"`sampling_params` has {len(params)} entries for a batch of {size}")
    return params


def _samples_per_prompt(req: GenerateBody, params: list[GenerateSamplingParams]) -> int:
    ns = {1 if p.n is None else p.n for p in params}
    if len(ns) > 1:
        raise InvalidRequest("every entry of `sampling_params` must have the same `n`")
    n = ns.pop()
    if req.n is not None:
        if any(p.n is not None for p in params) and req.n != n:
            raise InvalidRequest("`n` and `sampling_params.n` differ")
        n = req.n
    if n < 1:
        raise InvalidRequest("`n` must be >= 1")
    return n


def _routed_dp_rank(req: GenerateBody) -> int | None:
    for name in ("routed_dp_rank", "data_parallel_rank"):
        value = getattr(req, name)
        if value is not None and value < 0:
            raise InvalidRequest(f"`{name}` must be >= 0")
    return req.routed_dp_rank if req.routed_dp_rank is not None else req.data_parallel_rank


def _rids(rid: str | list[str] | None, size: int, n: int, batch: bool) -> list[str]:
    """One rid per generation, in index order (item i's n samples consecutive)."""
    total = size * n
    if isinstance(rid, list):
        if not batch:
            raise InvalidRequest("`rid` is a list but the request is not a batch")
        if len(rid) != size:
            raise InvalidRequest(f"`rid` has {len(rid)} entries for a batch of {size}")
        rids = rid if n == 1 else [f"{r}_{j}" for r in rid for j in range(n)]
    elif rid is None:
        rids = [uuid.uuid4().hex for _ in range(total)]
    elif batch:
        rids = [f"{rid}_{k}" for k in range(total)]
    else:
        rids = [rid]
    if any(not r for r in rids):
        raise InvalidRequest("`rid` must not be empty")
    if len(set(rids)) != len(rids):
        raise InvalidRequest("the rids of a batch must be distinct")
    return rids


def _per_item(value: Any, default: Any, name: str, size: int, n: int) -> list[Any]:
    """A logprob option for each batch item: one value for all, or a list with one per item."""
    if value is None:
        return [default] * size
    if not isinstance(value, list):
        return [value] * size
    if n > 1:
        raise InvalidRequest(f"`{name}` cannot be a list when n > 1")
    if len(value) != size:
        raise InvalidRequest(f"`{name}` has {len(value)} entries for a batch of {size}")
    return value


_msgpack = msgspec.msgpack.Encoder()


def check_encodable(req: GenerateRequest) -> GenerateRequest:
    """JSON integers are unbounded, msgpack's are 64-bit: a number past that is the client's error
    (400), not a bus failure (503)."""
    try:
        _msgpack.encode(req)
    except OverflowError as e:
        raise InvalidRequest(f"a number in the request is out of range: {e}") from None
    return req


# --- responses --------------------------------------------------------------------------------

# a logprob entry: [logprob, token_id, token text (with return_text_in_logprobs) or null]
LogprobEntry = tuple[float | None, int, str | None]


class MetaInfo(Struct, kw_only=True, omit_defaults=True):
    id: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: FinishReason | None  # null on every streamed event but the last
    e2e_latency: float  # seconds since the gateway received the request
    # with return_logprob only: entries (SGLang's shape), top: a list of them per position
    input_token_logprobs: list[LogprobEntry] | None = None
    output_token_logprobs: list[LogprobEntry] | None = None
    input_top_logprobs: list[list[LogprobEntry] | None] | None = None
    output_top_logprobs: list[list[LogprobEntry] | None] | None = None


def logprob_meta(acc: dict[str, list[Any]], token_bytes: dict[int, bytes] | None = None) -> dict[str, Any]:
    """MetaInfo's logprob fields from the (logprob, token_id) pairs a stream accumulated; with
    `token_bytes` (return_text_in_logprobs) each entry's third element is its token's text, as a
    one-token decode spells it (a partial UTF-8 character as U+FFFD)."""

    def text(t: int) -> str | None:
        if token_bytes is None or t not in token_bytes:
            return None
        return token_bytes[t].decode("utf-8", errors="replace")

    out: dict[str, Any] = {}
    for key, items in acc.items():
        if key.endswith("_top_logprobs"):
            out[key] = [[(v, t, text(t)) for v, t in row] if row else None for row in items]
        else:
            out[key] = [(v, t, text(t)) for v, t in items]
    return out


class GenerateResponse(Struct, kw_only=True, omit_defaults=True):
    """Non-streaming: the whole result. Streaming: one event, `text` / `output_ids` cumulative;
    a streamed batch tags each event with its item's `index`."""

    text: str
    output_ids: list[int]
    meta_info: MetaInfo
    index: int | None = None
