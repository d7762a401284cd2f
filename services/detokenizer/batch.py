"""TokenBatch -> one TextBatch per gateway. Pure apart from logging a failed item."""

from __future__ import annotations

import logging

from services.detokenizer.incremental import IncrementalDecoder, trim_at_stop
from shared.messages import RequestError, TextBatch, TextOutput, TokenBatch, TokenOutput

log = logging.getLogger("detokenizer")


def trims_stop_token(out: TokenOutput) -> bool:
    """Whether the final step's last id is a matched stop token (EOS or stop_token_ids) whose text
    is left out: SGLang's trim_matched_stop, unless no_stop_trim (the text of a special token is
    left out anyway with skip_special_tokens)."""
    matched = out.finish.matched if out.finish is not None else None
    return isinstance(matched, int) and not out.no_stop_trim and out.num_new > 0 and out.ids[-1] == matched


def detokenize_one(out: TokenOutput, decoder: IncrementalDecoder) -> TextOutput:
    final = out.finish is not None
    ids, num_new, all_ids = out.ids, out.num_new, out.all_ids
    if trims_stop_token(out):
        ids, num_new = ids[:-1], num_new - 1
        all_ids = all_ids[:-1] if all_ids is not None else None
    text = decoder.delta(ids, num_new, out.skip_special_tokens, final=final)
    full_text = None
    if final and all_ids is not None:
        whole = decoder.full_text(all_ids, out.skip_special_tokens)
        full_text = trim_at_stop(whole, out.stop, out.no_stop_trim)
        if full_text != whole:
            # a stop string was cut (before it, or after it with no_stop_trim): the last delta ends
            # where full_text ends, so a stream's text equals full_text whenever the stop string
            # ended within this step
            before = all_ids[: len(all_ids) - num_new]
            streamed = decoder.streamed_text(before, out.skip_special_tokens)
            text = full_text[len(streamed) :] if full_text.startswith(streamed) else ""
    return TextOutput(
        rid=out.rid,
        seq=out.seq,
        text=text,
        new_ids=list(out.ids[len(out.ids) - out.num_new :]) if out.num_new else [],
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens,
        cached_tokens=out.cached_tokens,
        finish=out.finish,
        full_text=full_text,
        input_token_logprobs=out.input_token_logprobs,
        input_top_logprobs=out.input_top_logprobs,
        output_token_logprobs=out.output_token_logprobs,
        output_top_logprobs=out.output_top_logprobs,
        token_bytes=token_bytes(out, decoder),
        prefill=out.prefill,
    )


def token_bytes(out: TokenOutput, decoder: IncrementalDecoder) -> dict[int, bytes] | None:
    """Each id named by the logprobs (output and prompt) -> its bytes alone; None without logprobs."""
    chosen = (out.output_token_logprobs or []) + (out.input_token_logprobs or [])
    rows = (out.output_top_logprobs or []) + (out.input_top_logprobs or [])
    if not chosen and not rows:
        return None
    ids = {t for _, t in chosen}
    ids.update(t for row in rows for _, t in row or ())
    return {t: decoder.to_bytes([t], skip_special_tokens=False) for t in sorted(ids)}


def detokenize_batch(batch: TokenBatch, decoder: IncrementalDecoder) -> dict[str, TextBatch]:
    """Outputs keep their batch order within each gateway's TextBatch. One failing item becomes a
    RequestError (500) for its rid and does not affect the others."""
    by_gateway: dict[str, TextBatch] = {}
    for out in batch.outputs:
        item: TextOutput | RequestError
        try:
            item = detokenize_one(out, decoder)
        except Exception:
            log.exception(
                "detokenization failed rid=%s gateway=%s dp_rank=%d", out.rid, out.gateway_id, batch.dp_rank
            )
            item = RequestError(rid=out.rid, message="detokenization failed", status=500)
        by_gateway.setdefault(out.gateway_id, TextBatch()).outputs.append(item)
    return by_gateway
