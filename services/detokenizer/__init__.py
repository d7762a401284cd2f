"""The detokenizer service: token ids -> streamed text, stateless."""

from services.detokenizer.batch import detokenize_batch
from services.detokenizer.incremental import IncrementalDecoder

__all__ = ["IncrementalDecoder", "detokenize_batch"]
