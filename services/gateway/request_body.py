"""Reading a JSON request body the way SGLang's and OpenAI's servers read it, for both protocols.

- the body must be a JSON object; bad JSON (or JSON nested past the decoder's depth) is a 400;
- `null` means the field's default: null fields are dropped before decoding (`without_nulls`), so a
  Struct's own default applies;
- unknown fields are ignored (the Structs do not forbid them) and can be listed (`unknown_fields`);
- a mistyped field is a 400 naming its JSON path (msgspec's "Expected `int | null`, got `str` - at
  `$.sampling_params.max_new_tokens`");
- a GenerateRequest that msgpack cannot encode (a JSON integer past 64 bits) is the client's error,
  not a bus failure (`check_encodable`).

Errors are `InvalidRequest`; the OpenAI side re-raises them in its own error shape.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from shared.messages import GenerateRequest

T = TypeVar("T")


class InvalidRequest(ValueError):
    """A request the client must fix: answered with 400 and this message."""


def json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; raises InvalidRequest."""
    try:
        data = msgspec.json.decode(raw)
    except msgspec.ValidationError as e:
        raise InvalidRequest(f"invalid request: {e}") from None
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequest("body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    return data


# fields whose value is a JSON Schema, where null is data (`"enum": [1, null]`, `"const": null`)
JSON_SCHEMA_FIELDS = frozenset({"schema", "parameters"})


def without_nulls(value: Any, deep: bool = False) -> Any:
    """`null` means the default: an object's null fields, dropped; `deep`: in every object within
    (lists included) but the JSON Schemas (JSON_SCHEMA_FIELDS, kept verbatim), else only in `value`."""
    if isinstance(value, dict):
        return {
            k: without_nulls(v, deep) if deep and k not in JSON_SCHEMA_FIELDS else v
            for k, v in value.items()
            if v is not None
        }
    if deep and isinstance(value, list):
        return [without_nulls(v, deep) for v in value]
    return value


def unknown_fields(data: dict[str, Any], kind: type[msgspec.Struct]) -> list[str]:
    """The top-level fields of `data` that `kind` does not have (decoding ignores them), sorted."""
    return sorted(k for k in data if k not in kind.__struct_fields__)


def convert(data: dict[str, Any], kind: type[T]) -> T:
    """`data` as a `kind`; a mistyped field raises InvalidRequest naming its path."""
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as e:
        raise InvalidRequest(f"invalid request: {e}") from None


_msgpack = msgspec.msgpack.Encoder()


def check_encodable(req: GenerateRequest) -> GenerateRequest:
    """JSON integers are unbounded, msgpack's are 64-bit: a number past that is the client's error
    (400), not a bus failure (503)."""
    try:
        _msgpack.encode(req)
    except OverflowError as e:
        raise InvalidRequest(f"a number in the request is out of range: {e}") from None
    return req
