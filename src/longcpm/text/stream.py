"""Incremental detokenization for streaming generation.

Byte-fallback pieces arrive one UTF-8 byte per token, so text is released only once the decoded window no
longer ends in an incomplete character. Each step decodes a short window of recent ids and diffs it against
the already released part of that window, so the cost per token does not grow with the sequence.
"""

from __future__ import annotations

from .tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Turn a stream of token ids into text deltas whose concatenation equals ``tokenizer.decode(all_ids)``."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._special = tokenizer.all_special_ids if skip_special_tokens else frozenset()
        self._reset()

    def _reset(self) -> None:
        # _ids[:_read] were released by the previous step and stay only as context, so decoders that treat a
        # sequence start specially see the same neighbours as a full decode; _ids[_read:] are still pending.
        self._ids: list[int] = []
        self._read = 0
        self._context_text = ""  # decode(_ids[:_read])

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (often "", e.g. mid-way through a character)."""
        token_id = self.tokenizer._check_id(token_id)
        if token_id in self._special:
            return ""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if len(text) <= len(self._context_text) or text.endswith(_REPLACEMENT):
            return ""  # nothing new yet, or the tail is an unfinished multi-byte character
        delta = text[len(self._context_text) :]
        # Slide the window: the ids just released become the context for the next step.
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._context_text = self._decode(self._ids)
        return delta

    def flush(self) -> str:
        """End of stream: release whatever is pending (a truncated character decodes to U+FFFD, as in decode())."""
        delta = self._decode(self._ids)[len(self._context_text) :] if self._read < len(self._ids) else ""
        self._reset()
        return delta
