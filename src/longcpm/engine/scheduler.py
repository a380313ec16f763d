"""Scheduler: continuous batching with chunked prefill and preemption by recompute.

Every step packs up to max_num_batched_tokens tokens: first one token for each decoding sequence, then the next
chunk of sequences still prefilling, then new requests (FIFO) while sequences and pages last. When a running
sequence needs a page and none is free, the most recently admitted sequence not yet in this step gives its pages
back and waits to be recomputed (its generated tokens are kept, so it resumes where it was). A prefill chunk is
shrunk to the pages available rather than preempting anyone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """The step's work: num_new[i] tokens of seqs[i], starting at its num_computed."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_steps = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        chosen: set[int] = set()
        self.num_steps += 1
        # decodes first (1 token each), then continuing prefills; least recently scheduled first, so a budget
        # smaller than the number of running sequences rotates over them instead of starving the last ones
        for seq in sorted(self.running, key=lambda s: (s.num_uncomputed > 1, s.last_step)):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            while self.blocks.room(seq) < 1:
                victim = next((s for s in reversed(self.running) if s.seq_id not in chosen and s is not seq), None)
                if victim is None:
                    break
                self.preempt(victim)
            if self.blocks.room(seq) < 1:
                if seq.num_computed > 0 and any(s is not seq for s in self.running):
                    self.preempt(seq)  # give way to the sequences already in this step
                continue
            n = min(seq.num_uncomputed, budget, self.blocks.room(seq))
            self.blocks.grow(seq, n)
            batch.seqs.append(seq)
            batch.num_new.append(n)
            chosen.add(seq.seq_id)
            seq.last_step = self.num_steps
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            matched = self.blocks.match_prefix(seq)
            n = min(seq.num_tokens - len(matched) * self.blocks.page_size, budget)
            if not self.blocks.fits_admission(matched, n):
                break
            self.waiting.popleft()
            self.blocks.admit(seq, matched)
            self.blocks.grow(seq, n)
            seq.status = Status.RUNNING
            seq.last_step = self.num_steps
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new.append(n)
            budget -= n
        return batch

    def preempt(self, seq: Sequence) -> None:
        """Free seq's pages; it goes back to the front of the queue and recomputes its tokens later."""
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove seq wherever it is and free its pages at once (finished or aborted)."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED
