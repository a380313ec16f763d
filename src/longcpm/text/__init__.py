"""Text side of the model: tokenizer, chat prompts and streaming detokenization."""

from .stream import StreamDecoder
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["StreamDecoder", "Tokenizer", "load_tokenizer"]
