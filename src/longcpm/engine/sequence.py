"""Sequence: one request inside the engine: its tokens, how many of them are in the KV cache, the pages that
hold them, and its sampling state. Scheduler, block manager and model runner all read and update it."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from .detokenizer import Detokenizer
from .sampling_params import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """token_ids = prompt + generated. num_computed: leading tokens whose K/V are in the pages of block_table
    (the rest, at least the last sampled token, go into the next steps). page_hashes: chained hashes of the full,
    computed pages registered for prefix reuse (page_hashes[i] belongs to block_table[i])."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    detok: Detokenizer
    rng: torch.Generator | None = None
    prompt: str | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    num_prompt_tokens: int = 0
    status: Status = Status.WAITING
    num_computed: int = 0
    num_cached: int = 0  # prompt tokens served from the prefix cache at the last admission
    block_table: list[int] = field(default_factory=list)
    page_hashes: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    last_step: int = 0  # the scheduler step that last ran it (fair rotation under a small token budget)
    arrival: float = 0.0
    first_token_time: float | None = None

    def __post_init__(self):
        self.num_prompt_tokens = self.num_prompt_tokens or len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def max_len(self) -> int:
        """Tokens this sequence may ever hold in the cache (the last sampled token is never fed back)."""
        return self.num_prompt_tokens + self.params.max_tokens - 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
