"""SamplingParams: how one request is decoded and when it stops (the vLLM-style user contract).

Validated on construction, so a bad value fails where the user wrote it, with a RequestError naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import RequestError


def _bad(name: str, msg: str) -> RequestError:
    return RequestError(f"SamplingParams.{name}: {msg}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SamplingParams:
    """temperature 0 is greedy. top_k -1 or 0 turns top-k off, top_p 1 turns nucleus sampling off, min_p 0 turns
    min-p off. Generation stops at max_tokens, at an eos id (unless ignore_eos), at any stop_token_ids, or when
    the text contains a stop string (the text is cut before it). seed makes a sampled request reproducible."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int = 16
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self):
        if not _is_num(self.temperature) or self.temperature < 0:
            raise _bad("temperature", f"must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise _bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise _bad("top_k", f"must be an integer >= 1, or -1 / 0 to disable, got {self.top_k!r}")
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise _bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise _bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise _bad("seed", f"must be an integer or None, got {self.seed!r}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if not all(isinstance(s, str) and s for s in stop):
            raise _bad("stop", f"must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop = stop
        ids = list(self.stop_token_ids or [])
        if not all(_is_int(i) and i >= 0 for i in ids):
            raise _bad("stop_token_ids", f"must be a list of token ids >= 0, got {self.stop_token_ids!r}")
        self.stop_token_ids = ids
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, f"must be True or False, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
