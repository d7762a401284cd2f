"""SGLang's `/generate` over HTTP: the request body and the response body.

Bodies are decoded with msgspec.json in strict mode, so a wrong type is reported with its JSON path
(e.g. "Expected `int`, got `str` - at `$.sampling_params.max_new_tokens`").
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
from msgspec import Struct

from shared.messages import FinishReason, GenerateRequest, SamplingParams


class InvalidRequest(ValueError):
    """A request the client must fix: answered with 400 and this message."""


class GenerateBody(Struct, kw_only=True, forbid_unknown_fields=True):
    # Batches (a list of strings, a list of id lists) are parsed only to be refused with a clear
    # message; the elements of a list are checked in `parse_generate`.
    text: str | list[Any] | None = None
    input_ids: list[int | list[Any]] | None = None
    sampling_params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    stream: bool = False
    rid: str | None = None
    routed_dp_rank: int | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1


_decoder = msgspec.json.Decoder(GenerateBody)


def parse_generate(body: bytes, gateway_id: str, created: float) -> GenerateRequest:
    """The bus message for a `/generate` body; raises InvalidRequest."""
    try:
        req = _decoder.decode(body)
    except msgspec.ValidationError as e:
        raise InvalidRequest(f"invalid request: {e}") from None
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"body is not valid JSON: {e}") from None

    if (req.text is None) == (req.input_ids is None):
        raise InvalidRequest("exactly one of `text` and `input_ids` is required")
    if isinstance(req.text, list):
        raise InvalidRequest("batch requests (`text` as a list) are not supported; send one request each")
    input_ids: list[int] | None = None
    if req.input_ids is not None:
        if any(isinstance(i, list) for i in req.input_ids):
            raise InvalidRequest(
                "batch requests (`input_ids` as a list of lists) are not supported; send one request each"
            )
        input_ids = [i for i in req.input_ids if isinstance(i, int)]
        if not input_ids:
            raise InvalidRequest("`input_ids` must not be empty")
        if any(i < 0 for i in input_ids):
            raise InvalidRequest("`input_ids` must be >= 0")
    problem = req.sampling_params.problem()
    if problem is not None:
        raise InvalidRequest(f"invalid sampling_params: {problem}")
    if req.rid is not None and not req.rid:
        raise InvalidRequest("`rid` must not be empty")
    if req.routed_dp_rank is not None and req.routed_dp_rank < 0:
        raise InvalidRequest("`routed_dp_rank` must be >= 0")
    if req.top_logprobs_num < 0 or req.logprob_start_len < -1:
        raise InvalidRequest("`top_logprobs_num` must be >= 0 and `logprob_start_len` >= -1")

    return check_encodable(GenerateRequest(
        rid=req.rid or uuid.uuid4().hex,
        gateway_id=gateway_id,
        text=req.text,
        input_ids=input_ids,
        sampling=req.sampling_params,
        stream=req.stream,
        routed_dp_rank=req.routed_dp_rank,
        created=created,
        return_logprob=req.return_logprob,
        top_logprobs_num=req.top_logprobs_num,
        logprob_start_len=req.logprob_start_len,
    ))


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


class MetaInfo(Struct, kw_only=True, omit_defaults=True):
    id: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: FinishReason | None  # null on every streamed event but the last
    e2e_latency: float  # seconds since the gateway received the request
    # with return_logprob only: [logprob, token_id, null] triples (SGLang's shape), top: lists of them
    input_token_logprobs: list[tuple[float | None, int, None]] | None = None
    output_token_logprobs: list[tuple[float, int, None]] | None = None
    input_top_logprobs: list[list[tuple[float, int, None]] | None] | None = None
    output_top_logprobs: list[list[tuple[float, int, None]] | None] | None = None


def logprob_meta(acc: dict[str, list[Any]]) -> dict[str, Any]:
    """MetaInfo's logprob fields from the (logprob, token_id) pairs a stream accumulated."""
    out: dict[str, Any] = {}
    for key, items in acc.items():
        if key.endswith("_top_logprobs"):
            out[key] = [[(v, t, None) for v, t in row] if row else None for row in items]
        else:
            out[key] = [(v, t, None) for v, t in items]
    return out


class GenerateResponse(Struct, kw_only=True):
    """Non-streaming: the whole result. Streaming: one event, `text` / `output_ids` cumulative."""

    text: str
    output_ids: list[int]
    meta_info: MetaInfo
