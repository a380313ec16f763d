"""The contract between the engine and its callers that stream (the HTTP server): what a request streams back,
and the asynchronous engine interface. The server depends only on this file's names, never on scheduler internals.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from .sampling_params import SamplingParams


@dataclass
class StreamDelta:
    """One increment of one request's output. text/token_ids are the NEW part since the previous delta.

    The last delta of a request has finished=True and finish_reason "stop" | "length" | "abort".
    prompt_tokens / completion_tokens are running totals (for OpenAI `usage`).
    """

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class AsyncEngine(Protocol):
    """Requests run concurrently (continuous batching); each caller iterates its own stream.

    `generate` validates first and raises longcpm.errors.RequestError (prompt too long, bad params) before the first
    delta. Leaving the iterator early (client disconnect: aclose / task cancel) or calling `abort` frees the
    request's sequence and KV blocks at once; the last delta it sees, if any, has finish_reason "abort".
    """

    model_name: str
    max_model_len: int

    def encode_prompt(self, prompt: str | list[int], *, chat: list[dict] | None = None) -> list[int]: ...

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[StreamDelta]: ...

    async def abort(self, request_id: str) -> None: ...

    async def shutdown(self, *, drain: bool = True) -> None: ...
