"""SGLang's `GenerateReqInput` and its `sampling_params`, field by field, and what dpserve does with
each: used (mapped to the bus's SamplingParams / GenerateRequest), accepted without effect (`model`,
`log_metrics`, `priority`, `stream_interval`, ...), or refused by the feature it asks for when set
to anything but its default (`REFUSED`, `REFUSED_SAMPLING`: LoRA, multimodal input, sessions,
hidden states, PD disaggregation, structural tags, stop_regex, ...).

Every field is optional (None: not given, the default applies). An unknown sampling parameter is a
400 naming it (`forbid_unknown_fields`); unknown top-level fields are ignored (services/gateway/
request_body.py). `sampling_seed` is SGLang's name for `seed`.
"""

from __future__ import annotations

from typing import Any

from msgspec import Struct

from services.gateway.request_body import InvalidRequest
from shared.messages import SamplingParams


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
    no_stop_trim: bool | None = None  # keep the matched stop string / stop token's text
    # structured output: at most one (services/scheduler/grammar.py)
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    # not implemented: refused unless unset (REFUSED_SAMPLING)
    stop_regex: str | list[str] | None = None
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
    "presence_penalty", "repetition_penalty", "stop_token_ids", "ignore_eos", "skip_special_tokens", "no_stop_trim",
    "regex", "json_schema", "ebnf",
)

# sampling parameter -> the feature it asks for, which dpserve does not implement (yet)
REFUSED_SAMPLING = {
    "stop_regex": "stop_regex (regular-expression stop conditions)",
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


assert set(REFUSED) <= set(GenerateBody.__struct_fields__)
assert set(REFUSED_SAMPLING) <= set(GenerateSamplingParams.__struct_fields__)


def refuse_unsupported(req: GenerateBody) -> None:
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
