"""DecodeGraphs: CUDA graphs of the decode step, one per (batch-size bucket, dense | sparse).

Inputs live in static device buffers (token ids, positions, slots, block tables, lengths); a step copies its rows
in, pads the bucket with rows that read and write only the pool's scratch page 0, and replays. Graphs are
captured lazily on a bucket's first use, after one eager run of the same step has compiled every kernel (the
eager run and the replay write the same K/V, so running both is harmless). All graphs share one memory pool.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kvcache.paged import PagedStep


def buckets(max_bs: int) -> list[int]:
    out = [b for b in (1, 2, 4, 8) if b < max_bs] + list(range(16, max_bs, 16))
    return sorted(set(out + [max_bs]))


class DecodeGraphs:
    def __init__(self, runner, max_bs: int, max_pages: int, compile: bool = False):
        self.runner, self.max_bs, self.max_pages = runner, max_bs, max_pages
        dev = runner.device
        self.ids = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.pos = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.slots = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.tables = torch.zeros(max_bs, max_pages, dtype=torch.int32, device=dev)
        self.lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        pin = dev.type == "cuda"
        self.host = torch.zeros(4, max_bs, dtype=torch.long, pin_memory=pin)
        self.host_tables = torch.zeros(max_bs, max_pages, dtype=torch.int32, pin_memory=pin)
        self.buckets = buckets(max_bs)
        self.graphs: dict[tuple[int, bool], Callable[[], None]] = {}  # replay functions
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}
        self.mempool = None
        self.fn = runner.logits_of
        if compile:
            self.fn = torch.compile(runner.logits_of, dynamic=False)

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.max_bs

    def bucket(self, batch_size: int) -> int:
        return next(b for b in self.buckets if b >= batch_size)

    def step(self, bs: int, sparse: bool) -> PagedStep:
        return PagedStep(q_lens=[1] * bs, past_lens=[1] * bs, sparse_rows=[sparse] * bs,
                         slot_mapping=self.slots[:bs], block_tables=self.tables[:bs], seq_lens=self.lens[:bs],
                         decode_only=True)

    def run(self, ids: list[int], pos: list[int], slots: list[int], tables: list[list[int]], lens: list[int],
            sparse: bool) -> torch.Tensor:
        """Logits [B, vocab] of a decode step of B = len(ids) sequences."""
        B = len(ids)
        bs = self.bucket(B)
        pad = [0] * (bs - B)
        host = self.host.numpy()
        host[0, :bs] = ids + pad
        host[1, :bs] = pos + pad
        host[2, :bs] = slots + pad
        host[3, :bs] = lens + [1] * (bs - B)
        npages = max(len(t) for t in tables)
        ht = self.host_tables.numpy()
        ht[:bs, :npages] = 0
        for i, t in enumerate(tables):
            ht[i, : len(t)] = t
        self.ids[:bs].copy_(self.host[0, :bs], non_blocking=True)
        self.pos[:bs].copy_(self.host[1, :bs], non_blocking=True)
        self.slots[:bs].copy_(self.host[2, :bs], non_blocking=True)
        self.lens[:bs].copy_(self.host[3, :bs], non_blocking=True)
        # columns past a row's pages may hold stale page ids: they are valid pages and never read for that row
        self.tables[:bs, :npages].copy_(self.host_tables[:bs, :npages], non_blocking=True)
        key = (bs, sparse)
        if key not in self.graphs:
            self._capture(key)
        self.graphs[key]()
        return self.outputs[key][:B]

    def _capture(self, key: tuple[int, bool]) -> None:
        bs, sparse = key
        step = self.step(bs, sparse)
        self.graphs[key], self.outputs[key] = self.record(lambda: self.fn(self.ids[:bs], self.pos[:bs], step))

    def record(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """Capture fn into a CUDA graph: (replay, its static output)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # compiles kernels (and torch.compile) outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            out = fn()
        if self.mempool is None:
            self.mempool = graph.pool()
        return graph.replay, out

    def capture_all(self, sparse_too: bool = False) -> None:
        """Capture every bucket up front (with the pool's scratch page as input), e.g. before timing."""
        for bs in reversed(self.buckets):
            for sparse in (False, True) if sparse_too else (False,):
                if (bs, sparse) not in self.graphs:
                    self.ids.zero_(), self.pos.zero_(), self.slots.zero_(), self.tables.zero_(), self.lens.fill_(1)
                    self._capture((bs, sparse))
