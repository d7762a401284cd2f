"""The detokenizer service: TokenBatch (queue group) -> TextBatch per gateway.

Stateless: several instances share DETOKENIZER_QUEUE and consecutive steps of one request may
reach different instances; every TokenOutput carries the context its delta needs.
"""

from __future__ import annotations

import os

from services.detokenizer.batch import detokenize_batch
from services.detokenizer.incremental import IncrementalDecoder
from shared.actor import Service
from shared.config import ServerArgs
from shared.messages import TokenBatch
from shared.subjects import DETOKENIZER_QUEUE


class DetokenizerService(Service):
    name = "detokenizer"
    needs_model = True

    def __init__(self, args: ServerArgs) -> None:
        super().__init__(args)
        self.decoder = IncrementalDecoder(os.path.join(args.model_path, "tokenizer.json"))

    async def start(self) -> None:
        if not self.decoder.exact:
            self.log.warning("tokenizer decoder is not ByteLevel: streamed text is approximate")
        await self.bus.subscribe(self.subjects.detok, TokenBatch, self.on_batch, queue=DETOKENIZER_QUEUE)

    async def on_batch(self, batch: TokenBatch) -> None:
        for gateway_id, text_batch in detokenize_batch(batch, self.decoder).items():
            await self.bus.publish(self.subjects.out(gateway_id), text_batch)
