"""The tokenizer service: text or ids -> validated TokenizedRequest."""

from services.tokenizer.tokenize import TextTokenizer
from services.tokenizer.validate import validate

__all__ = ["TextTokenizer", "validate"]
