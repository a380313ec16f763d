"""Detokenizer: one request's incremental text and stop conditions (eos / stop ids, stop strings, max_tokens).

Text is released only when it can no longer become part of a stop string, so a stop string is never streamed
before it is recognised; the released pieces concatenate to the final text. Used by LLMEngine's sequences and
BatchGenerator's rows.
"""

from __future__ import annotations

from ..text import StreamDecoder, Tokenizer
from .sampling_params import SamplingParams


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, eos_ids: frozenset[int]):
        self.params = params
        self.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_ids)
        self.decoder = StreamDecoder(tokenizer, params.skip_special_tokens)
        self.longest = max((len(s) for s in params.stop), default=0)
        self.num_tokens = 0
        self.text = ""  # decoded so far, cut at a stop string once one is found
        self.sent = 0  # characters of text already released
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def accept(self, token_id: int) -> str:
        """Record one sampled token; return the text it releases (all of the rest once the request finishes)."""
        p = self.params
        self.num_tokens += 1
        if token_id in self.stop_ids:
            self.finish_reason, self.stop_reason = "stop", token_id
            piece = self.decoder.flush()
        else:
            piece = self.decoder.push(token_id)
            if self.num_tokens >= p.max_tokens:
                self.finish_reason = "length"
                piece += self.decoder.flush()
        old = len(self.text)
        self.text += piece
        if self.longest and piece:
            start = max(0, old - self.longest + 1)
            hits = [(pos, s) for s in p.stop if (pos := self.text.find(s, start)) >= 0]
            if hits:
                pos, s = min(hits)
                self.text = self.text[:pos]
                self.finish_reason, self.stop_reason = "stop", s
        hold = 0 if self.finished else max(self.longest - 1, 0)
        upto = max(self.sent, len(self.text) - hold)
        delta, self.sent = self.text[self.sent: upto], upto
        return delta

    def finish(self, reason: str) -> str:
        """End the request from outside (abort): release nothing more."""
        if self.finish_reason is None:
            self.finish_reason = reason
        return ""
