"""GenerateRequest -> TokenizedRequest, or the RequestError (HTTP 400) that rejects it. Pure.

Sampling params the request names in `unset_sampling` are filled here, where the model is known:
generation_config.json's defaults, and max_new_tokens = the rest of the context.
"""

from __future__ import annotations

import jinja2
import msgspec

from services.tokenizer.tokenize import TextTokenizer
from services.tokenizer.tools import parse_tools, render_chat
from shared.messages import GenerateRequest, RequestError, TokenizedRequest


def validate(req: GenerateRequest, tok: TextTokenizer) -> TokenizedRequest | RequestError:
    """Invariant of a TokenizedRequest it returns: 1 <= len(input_ids), every id (and stop token id)
    in [0, vocab_size), and len(input_ids) + max_new_tokens <= context_length."""

    def reject(message: str) -> RequestError:
        return RequestError(rid=req.rid, message=message, status=400)

    sampling = req.sampling
    defaults = {k: v for k, v in tok.sampling_defaults.items() if k in req.unset_sampling}
    if defaults:
        sampling = msgspec.structs.replace(sampling, **defaults)
    problem = sampling.problem()
    if problem is not None:
        return reject(problem)
    bad_stop = next((t for t in sampling.stop_token_ids if t >= tok.vocab_size), None)
    if bad_stop is not None:
        return reject(f"stop_token_ids contains token id {bad_stop}, outside the vocabulary [0, {tok.vocab_size}).")
    bad_bias = next((t for t in sampling.logit_bias if t >= tok.vocab_size), None)
    if bad_bias is not None:
        return reject(f"logit_bias contains token id {bad_bias}, outside the vocabulary [0, {tok.vocab_size}).")
    if req.top_logprobs_num < 0 or req.logprob_start_len < -1:
        return reject("top_logprobs_num must be >= 0 and logprob_start_len >= -1")

    given = sum(x is not None for x in (req.text, req.input_ids, req.messages))
    if given != 1:
        return reject("Exactly one of text, input_ids or messages must be provided.")
    if req.messages is not None:
        if not req.messages:
            return reject("`messages` must not be empty.")
        try:
            prompt = render_chat(tok, req.messages, parse_tools(req.tools))
        except ValueError as e:  # no chat template, or tools that are not a list of objects
            return reject(str(e))
        except jinja2.TemplateError as e:  # the template refused these messages
            return reject(f"the chat template failed: {e}")
        ids = tok.encode(prompt)
    elif req.input_ids is not None:
        ids = req.input_ids
        bad = next((i for i in ids if not 0 <= i < tok.vocab_size), None)
        if bad is not None:
            return reject(f"input_ids contains token id {bad}, outside the vocabulary [0, {tok.vocab_size}).")
    else:
        assert req.text is not None
        if not req.text:
            return reject("The input prompt is empty.")
        ids = tok.encode(req.text)
    if not ids:
        return reject("The input prompt is empty.")

    n_input, n_new, limit = len(ids), sampling.max_new_tokens, tok.context_length
    if n_input > limit:
        return reject(
            f"The input ({n_input} tokens) is longer than the model's context length ({limit} tokens)."
        )
    if "max_new_tokens" in req.unset_sampling:  # up to the rest of the context
        n_new = limit - n_input
        if n_new < sampling.min_new_tokens:
            n_new = sampling.min_new_tokens  # rejected below: the input leaves too little room
        sampling = msgspec.structs.replace(sampling, max_new_tokens=n_new)
    if n_input + n_new > limit:
        return reject(
            f"Requested token count exceeds the model's maximum context length of {limit} tokens. "
            f"You requested a total of {n_input + n_new} tokens: {n_input} tokens from the input "
            f"messages and {n_new} tokens for the completion. Please reduce the number of tokens in "
            "the input messages or the completion to fit within the limit."
        )

    return TokenizedRequest(
        rid=req.rid,
        gateway_id=req.gateway_id,
        input_ids=list(ids),
        sampling=sampling,
        stream=req.stream,
        routed_dp_rank=req.routed_dp_rank,
        created=req.created,
        return_logprob=req.return_logprob,
        top_logprobs_num=req.top_logprobs_num,
        logprob_start_len=req.logprob_start_len,
        first_seq=req.first_seq,
    )
