"""BlockManager: which KV pages each sequence owns, and prefix reuse across sequences.

Pages are ref-counted. A full page whose K/V (and compressed keys) have been computed is registered under a
chained hash of every token up to its end, so a later sequence with the same prefix maps the same page instead
of recomputing it. Freed pages keep their hash until they are handed out again, least recently freed first;
pages that hold nothing reusable go to the front of that line. Page 0 is the pool's scratch page, never handed out.
"""

from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence

_ROOT = 0x9E3779B97F4A7C15  # chain seed of the first page


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True):
        self.num_pages, self.page_size, self.prefix_caching = num_pages, page_size, prefix_caching
        self.ref = [0] * num_pages
        self.free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(1, num_pages))
        self.hash_of: dict[int, int] = {}  # page -> chained hash
        self.page_of: dict[int, int] = {}  # chained hash -> page
        self.tokens_of: dict[int, tuple[int, ...]] = {}  # page -> its tokens (hash collisions are checked)
        self.reused_tokens = 0  # prompt tokens served from the prefix cache, over the engine's life

    @property
    def capacity_tokens(self) -> int:
        return (self.num_pages - 1) * self.page_size

    @property
    def num_free(self) -> int:
        return len(self.free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def match_prefix(self, seq: Sequence) -> list[tuple[int, int]]:
        """(page, hash) of the cached full pages that start seq's tokens; the last token is always recomputed
        (its logits are needed), so at most (num_tokens - 1) // page_size pages."""
        if not self.prefix_caching:
            return []
        out, prev, ps = [], _ROOT, self.page_size
        for i in range((seq.num_tokens - 1) // ps):
            toks = tuple(seq.token_ids[i * ps: (i + 1) * ps])
            h = hash((prev, toks))
            p = self.page_of.get(h)
            if p is None or self.tokens_of.get(p) != toks:
                break
            out.append((p, h))
            prev = h
        return out

    def fits_admission(self, matched: list[tuple[int, int]], num_new: int) -> bool:
        need = self.pages_for(len(matched) * self.page_size + num_new) - len(matched)
        revived = sum(1 for p, _ in matched if self.ref[p] == 0)
        return need + revived <= len(self.free)

    def admit(self, seq: Sequence, matched: list[tuple[int, int]]) -> None:
        """Give seq its cached prefix pages; its computation starts after them."""
        for p, _ in matched:
            if self.ref[p] == 0:
                del self.free[p]
            self.ref[p] += 1
        seq.block_table = [p for p, _ in matched]
        seq.page_hashes = [h for _, h in matched]
        seq.num_computed = seq.num_cached = len(matched) * self.page_size
        self.reused_tokens += seq.num_cached

    def pages_needed(self, seq: Sequence, num_new: int) -> int:
        return max(0, self.pages_for(seq.num_computed + num_new) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_new: int) -> bool:
        return self.pages_needed(seq, num_new) <= len(self.free)

    def room(self, seq: Sequence) -> int:
        """How many more tokens seq could compute with the pages it has plus every free page."""
        return (len(seq.block_table) + len(self.free)) * self.page_size - seq.num_computed

    def grow(self, seq: Sequence, num_new: int) -> None:
        """Pages for num_new more tokens (callers check can_grow first)."""
        for _ in range(self.pages_needed(seq, num_new)):
            p, _ = self.free.popitem(last=False)
            h = self.hash_of.pop(p, None)
            if h is not None:
                self.tokens_of.pop(p, None)
                if self.page_of.get(h) == p:
                    del self.page_of[h]
            self.ref[p] = 1
            seq.block_table.append(p)

    def register(self, seq: Sequence) -> None:
        """Publish seq's newly completed full pages for reuse (call after their K/V were computed)."""
        if not self.prefix_caching:
            return
        ps = self.page_size
        for i in range(len(seq.page_hashes), seq.num_computed // ps):
            toks = tuple(seq.token_ids[i * ps: (i + 1) * ps])
            h = hash((seq.page_hashes[-1] if seq.page_hashes else _ROOT, toks))
            seq.page_hashes.append(h)
            p = seq.block_table[i]
            if h not in self.page_of and p not in self.hash_of:
                self.page_of[h], self.hash_of[p], self.tokens_of[p] = p, h, toks

    def release(self, seq: Sequence) -> None:
        """Drop seq's pages (finish, abort or preemption); shared pages stay with their other owners."""
        for p in reversed(seq.block_table):
            self.ref[p] -= 1
            if self.ref[p] == 0:
                self.free[p] = None
                if p not in self.hash_of:
                    self.free.move_to_end(p, last=False)
        seq.block_table, seq.page_hashes = [], []
        seq.num_computed = 0
