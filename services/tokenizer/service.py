"""The tokenizer service: GenerateRequest (queue group) -> TokenizedRequest to the dispatcher.

Stateless; any number of instances share TOKENIZER_QUEUE. A rejected request is answered
directly to its gateway with a RequestError (`Service.reply_error`). It also answers the gateway's
`/tokenize` and `/detokenize` (request/reply, same queue group): the gateway has no tokenizer.
"""

from __future__ import annotations

import uuid
from collections import Counter

from services.tokenizer.tokenize import TextTokenizer
from services.tokenizer.validate import validate
from shared.actor import Service
from shared.config import ServerArgs
from shared.messages import (
    DetokenizeQuery,
    DetokenizeReply,
    GenerateRequest,
    RequestError,
    TokenizedRequest,
    TokenizeQuery,
    TokenizeReply,
)
from shared.metrics import Sample, publish_snapshots
from shared.subjects import TOKENIZER_QUEUE


class TokenizerService(Service):
    name = "tokenizer"
    needs_model = True

    def __init__(self, args: ServerArgs) -> None:
        super().__init__(args)
        self.tok = TextTokenizer(args.model_path, args.context_length)
        self.results: Counter[str] = Counter()  # ok / rejected / failed -> requests

    async def start(self) -> None:
        self.log.info(
            "loaded tokenizer model=%s vocab=%d context_length=%d add_bos=%s eos=%s",
            self.args.model_path,
            self.tok.vocab_size,
            self.tok.context_length,
            self.tok.add_bos,
            self.tok.eos_token_ids,
        )
        await self.bus.subscribe(
            self.subjects.tokenize, GenerateRequest, self.on_request, queue=TOKENIZER_QUEUE
        )
        await self.bus.serve(self.subjects.tokenize_text, TokenizeQuery, self.on_tokenize, queue=TOKENIZER_QUEUE)
        await self.bus.serve(self.subjects.detokenize_ids, DetokenizeQuery, self.on_detokenize, queue=TOKENIZER_QUEUE)
        self.spawn(publish_snapshots(self.bus, self.subjects.metrics, "tokenizer", uuid.uuid4().hex, self.samples))

    def samples(self) -> list[Sample]:
        return [Sample("dpserve:tokenizer_requests_total", n, {"result": k}) for k, n in sorted(self.results.items())]

    async def on_request(self, req: GenerateRequest) -> None:
        try:
            result = validate(req, self.tok)
        except Exception:
            self.log.exception("tokenization failed rid=%s gateway=%s", req.rid, req.gateway_id)
            result = RequestError(rid=req.rid, message="tokenization failed", status=500)
            self.results["failed"] += 1
        else:
            if isinstance(result, RequestError):
                self.log.info("rejected rid=%s gateway=%s reason=%r", req.rid, req.gateway_id, result.message)
            self.results["ok" if isinstance(result, TokenizedRequest) else "rejected"] += 1
        if isinstance(result, RequestError):
            await self.reply_error(req.gateway_id, result.rid, result.message, result.status)
            return
        await self.bus.publish(self.subjects.dispatch, result)

    async def on_tokenize(self, q: TokenizeQuery) -> TokenizeReply:
        return tokenize_query(q, self.tok)

    async def on_detokenize(self, q: DetokenizeQuery) -> DetokenizeReply:
        return detokenize_query(q, self.tok)


def tokenize_query(q: TokenizeQuery, tok: TextTokenizer) -> TokenizeReply:
    if q.add_special_tokens:
        tokens = [tok.encode(p) for p in q.prompts]
    else:
        tokens = [tok.tokenizer.encode(p, add_special_tokens=False).ids for p in q.prompts]
    return TokenizeReply(tokens=tokens, max_model_len=tok.context_length)


def detokenize_query(q: DetokenizeQuery, tok: TextTokenizer) -> DetokenizeReply:
    bad = next((i for ids in q.tokens for i in ids if not 0 <= i < tok.vocab_size), None)
    if bad is not None:
        return DetokenizeReply(error=f"token id {bad} is outside the vocabulary [0, {tok.vocab_size})")
    return DetokenizeReply(texts=[tok.decode(ids, q.skip_special_tokens) for ids in q.tokens])
