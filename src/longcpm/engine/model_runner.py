"""ModelRunner: turns a ScheduledBatch into tensors, runs the model over the paged pool and samples on the device.

A step is packed: input [1, T] holds every scheduled sequence's new tokens back to back and the PagedStep says
where each sequence's tokens and pages are. Only sequences whose chunk reaches their last token are sampled, each
with its own torch.Generator (ops/sampling.py). Pure decode steps replay CUDA graphs (cuda_graph.py) when enabled.
"""

from __future__ import annotations

import torch

from ..kvcache.contiguous import StepMeta
from ..kvcache.paged import PagedKVPool, PagedStep
from ..ops.sampling import sample
from .config import EngineConfig
from .cuda_graph import DecodeGraphs
from .scheduler import ScheduledBatch
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model, pool: PagedKVPool, config: EngineConfig, max_model_len: int):
        self.model, self.pool, self.config = model, pool, config
        self.device = model.device
        self.page_size = pool.page_size
        self.sparse = model.config.sparse_config
        self.attention = config.attention
        self.max_pages = -(-max_model_len // pool.page_size)
        use_graphs = config.cuda_graphs if config.cuda_graphs is not None else self.device.type == "cuda"
        if use_graphs and self.device.type != "cuda":
            use_graphs = False  # graphs are a CUDA feature; the CPU runs the same step eagerly
        self.graphs = DecodeGraphs(self, config.max_num_seqs, self.max_pages, config.compile) if use_graphs else None

    def is_sparse(self, total_len: int) -> bool:
        if self.sparse is None or self.attention == "dense":
            return False
        return self.attention == "sparse" or self.sparse.is_sparse(total_len)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[tuple[Sequence, int]]:
        """Run one step; return (sequence, sampled token) for the sequences whose chunk reached their end."""
        PS = self.page_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        last: list[int] = []
        sampled: list[Sequence] = []
        for seq, n in zip(batch.seqs, batch.num_new):
            c, bt = seq.num_computed, seq.block_table
            ids += seq.token_ids[c: c + n]
            pos += range(c, c + n)
            slots += [bt[p // PS] * PS + p % PS for p in range(c, c + n)]
            if c + n == seq.num_tokens:
                sampled.append(seq)
                last.append(len(ids) - 1)
        past = [s.num_computed for s in batch.seqs]
        totals = [c + n for c, n in zip(past, batch.num_new)]
        sparse_rows = [self.is_sparse(t) for t in totals]
        decode_only = all(n == 1 and c > 0 for n, c in zip(batch.num_new, past))
        if decode_only and self.graphs is not None and self.graphs.fits(len(batch)) and len(set(sparse_rows)) == 1:
            logits = self.graphs.run(ids, pos, slots, [s.block_table for s in batch.seqs], totals, sparse_rows[0])
        else:
            step = self._step(batch, past, sparse_rows, slots, decode_only)
            h = self.forward(self._tensor(ids, torch.long), self._tensor(pos, torch.long), step)
            logits = self.model.logits(h[torch.tensor(last, device=self.device)]) if sampled else None
        if not sampled:
            return []
        return list(zip(sampled, self.sample(logits, sampled)))

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, step: PagedStep) -> torch.Tensor:
        """Hidden states [T, hidden] of one packed step. Rope only needs a batch-wide length: the engine refuses
        LongRoPE configs whose long and short factors differ beyond original_max_position_embeddings."""
        T = ids.shape[0]
        top = max(step.total_lens) if step.q_lens else T
        meta = StepMeta(positions=pos[None], new_lens=[T], past_lens=[max(0, top - T)], attention=self.attention)
        cache = self.pool.view(step, self.attention, self.config.backend)
        return self.model.model(ids[None], meta, cache)[0]

    def logits_of(self, ids: torch.Tensor, pos: torch.Tensor, step: PagedStep) -> torch.Tensor:
        """The decode step the CUDA graphs capture: every row is sampled."""
        return self.model.logits(self.forward(ids, pos, step))

    def _step(self, batch: ScheduledBatch, past, sparse_rows, slots, decode_only) -> PagedStep:
        NP = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [0] * (NP - len(s.block_table)) for s in batch.seqs]
        return PagedStep(q_lens=list(batch.num_new), past_lens=past, sparse_rows=sparse_rows,
                         slot_mapping=self._tensor(slots, torch.long), block_tables=self._tensor(tables, torch.int32),
                         seq_lens=self._tensor([c + n for c, n in zip(past, batch.num_new)], torch.int32),
                         decode_only=decode_only)

    def _tensor(self, data, dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        ps = [s.params for s in seqs]
        if all(p.greedy for p in ps):
            return logits.argmax(dim=-1).tolist()
        dev = logits.device
        temp = torch.tensor([p.temperature for p in ps], dtype=torch.float32, device=dev)
        top_p = torch.tensor([p.top_p for p in ps], dtype=torch.float32, device=dev)
        top_k = torch.tensor([max(p.top_k, 0) for p in ps], dtype=torch.long, device=dev)
        min_p = torch.tensor([p.min_p for p in ps], dtype=torch.float32, device=dev)
        return sample(logits, temp, top_p, top_k, min_p, [s.rng for s in seqs]).tolist()
