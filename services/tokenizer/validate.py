"""GenerateRequest -> TokenizedRequest, or the RequestError (HTTP 400) that rejects it. Pure."""

from __future__ import annotations

from services.tokenizer.tokenize import TextTokenizer
from shared.messages import GenerateRequest, RequestError, TokenizedRequest


def validate(req: GenerateRequest, tok: TextTokenizer) -> TokenizedRequest | RequestError:
    """Invariant of a TokenizedRequest it returns: 1 <= len(input_ids), every id in
    [0, vocab_size), and len(input_ids) + max_new_tokens <= context_length."""

    def reject(message: str) -> RequestError:
        return RequestError(rid=req.rid, message=message, status=400)

    problem = req.sampling.check()
    if problem is not None:
        return reject(problem)

    if (req.text is None) == (req.input_ids is None):
        return reject("Exactly one of text or input_ids must be provided.")
    if req.input_ids is not None:
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

    n_input, n_new, limit = len(ids), req.sampling.max_new_tokens, tok.context_length
    if n_input > limit:
        return reject(
            f"The input ({n_input} tokens) is longer than the model's context length ({limit} tokens)."
        )
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
        sampling=req.sampling,
        stream=req.stream,
        routed_dp_rank=req.routed_dp_rank,
        created=req.created,
    )
