"""SGLang's `/generate` over HTTP: what a request body becomes, and the response body.

A body is read as SGLang's `GenerateReqInput` reads it (services/gateway/request_body.py): `null`
means the field's default; a mistyped field is a 400 naming its JSON path; unknown top-level fields
are ignored and returned in `GenerateCall.ignored` (the gateway counts them). Which fields are used,
accepted without effect, or refused by the feature they ask for: services/gateway/sglang_fields.py.
How a body becomes one GenerateRequest per generation (batches, n, rids):
services/gateway/generate_batch.py.

A single request is answered with one `GenerateResponse`, a batch with a JSON list of them in index
order; streamed, each event is one item's `GenerateResponse` so far, tagged by `index` in a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from msgspec import Struct

from services.gateway.generate_batch import expand
from services.gateway.request_body import InvalidRequest, convert, json_object, unknown_fields, without_nulls
from services.gateway.sglang_fields import GenerateBody, refuse_unsupported
from shared.messages import FinishReason, GenerateRequest


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
    data = json_object(body)
    known = without_nulls(data)  # the top level's and sampling_params' nulls: nested objects keep theirs
    raw_params = known.get("sampling_params")
    if isinstance(raw_params, dict):
        known["sampling_params"] = without_nulls(raw_params)
    elif isinstance(raw_params, list):
        known["sampling_params"] = [without_nulls(p) for p in raw_params]
    req = convert(known, GenerateBody)
    refuse_unsupported(req)
    reqs, batch = expand(req, gateway_id, created, max_requests)
    return GenerateCall(reqs, batch, req.stream, req.return_text_in_logprobs, unknown_fields(data, GenerateBody))


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
