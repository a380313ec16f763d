"""A paged KV pool (pages of page_size tokens, one K and one V tensor per layer, plus InfLLM-V2 compressed keys)
and the per-step view through which the model's attention reads and writes it.

Page 0 is scratch: padded rows of a captured decode batch and "no new window" writes land there, so no real
sequence may own it. Which pages a sequence owns is policy (the engine's block manager); this file only stores
bytes and routes one step's attention: decode rows through the paged decode op, prefill chunks by gathering their
sequence's pages. Rows are packed: the model sees input [1, T] and the step says where each sequence's tokens are.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..config import ModelConfig, SparseConfig
from ..errors import ConfigError
from ..ops import infllmv2_attention, infllmv2_decode
from ..ops.dispatch import resolve_backend
from ..ops.paged import (
    append_compressed,
    append_compressed_decode,
    gather_compressed,
    gather_kv,
    paged_decode_attention,
    prefill_attention,
    store_kv,
)
from .contiguous import StepMeta


@dataclass
class PagedStep:
    """Where one packed step's tokens go. Sequence i has q_lens[i] new tokens at positions past_lens[i].. and
    owns the pages block_tables[i]. Device tensors: slot_mapping int64 [T], block_tables int32 [S, NP], seq_lens
    int32 [S] (keys after the step). sparse_rows: which sequences use InfLLM-V2 (decided by the engine).
    decode_only: one token per sequence and no host reads (the CUDA-graph path)."""

    q_lens: list[int]
    past_lens: list[int]
    sparse_rows: list[bool]
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    decode_only: bool = False
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def total_lens(self) -> list[int]:
        return [p + n for p, n in zip(self.past_lens, self.q_lens)]

    @property
    def starts(self) -> list[int]:
        out, s = [], 0
        for n in self.q_lens:
            out.append(s)
            s += n
        return out


class PagedKVPool:
    """K/V pages [P, PS, H, D] per layer; c1/c2 pages [P, PS/stride, H, D] when the model is sparse."""

    def __init__(self, config: ModelConfig, num_pages: int, page_size: int = 64, device=None,
                 dtype: torch.dtype = torch.bfloat16):
        check_page_size(config, page_size)
        if num_pages < 2:
            raise ConfigError(f"the KV pool needs at least 2 pages (page 0 is scratch), got {num_pages}")
        self.config, self.num_pages, self.page_size, self.dtype = config, num_pages, page_size, dtype
        H, D, sc = config.num_key_value_heads, config.head_dim, config.sparse_config
        # CUDA: zeros, so padded graph rows and masked kernel lanes never meet NaN garbage. CPU: readers only touch
        # written slots, and untouched pages of an empty tensor cost no memory, so a generous pool is free.
        new = torch.zeros if torch.device(device or "cpu").type == "cuda" else torch.empty
        self.k, self.v, self.c1, self.c2 = [], [], [], []
        for _ in range(config.num_hidden_layers):
            self.k.append(new(num_pages, page_size, H, D, device=device, dtype=dtype))
            self.v.append(new(num_pages, page_size, H, D, device=device, dtype=dtype))
            if sc is not None:
                self.c1.append(new(num_pages, page_size // sc.kernel_stride, H, D, device=device, dtype=dtype))
                if sc.uses_c2():
                    self.c2.append(new(num_pages, page_size // sc.lse_kernel_stride, H, D, device=device, dtype=dtype))

    @staticmethod
    def page_bytes(config: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
        """Bytes of one page over all layers: K, V and the compressed keys (ModelConfig's per-token figures)."""
        b = torch.finfo(dtype).bits // 8
        return int(page_size * (config.kv_bytes_per_token(b) + config.compressed_kv_bytes_per_token(b)))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in (self.k, self.v, self.c1, self.c2) for t in ts)

    def view(self, step: PagedStep, attention: str = "auto", backend: str | None = None) -> PagedKVCache:
        return PagedKVCache(self, step, attention, backend)


def check_page_size(config: ModelConfig, page_size: int) -> None:
    sc = config.sparse_config
    strides = [] if sc is None else [sc.kernel_stride, sc.block_size] + ([sc.lse_kernel_stride] if sc.uses_c2() else [])
    if page_size < 16 or page_size & (page_size - 1) or any(page_size % s for s in strides):
        raise ConfigError(f"page_size must be a power of 2 >= 16 and a multiple of the sparse block size and "
                          f"compression strides {strides}, got {page_size}")
    if sc is not None and (sc.kernel_size % sc.kernel_stride or sc.lse_kernel_size % sc.lse_kernel_stride):
        raise ConfigError("paged compressed keys need kernel sizes that are multiples of their strides")


class PagedKVCache:
    """What the model is given as `cache` for one step: per-layer views of the pool bound to the step."""

    def __init__(self, pool: PagedKVPool, step: PagedStep, attention: str, backend: str | None):
        self.pool, self.step, self.attention, self.backend = pool, step, attention, backend

    def __getitem__(self, i: int) -> PagedLayerCache:
        p = self.pool
        return PagedLayerCache(p.k[i], p.v[i], p.c1[i] if p.c1 else None, p.c2[i] if p.c2 else None, self.step,
                               self.backend)


class PagedLayerCache:
    """One layer's pages bound to one step. The Attention layer hands it q/k/v and gets the output back."""

    paged = True

    def __init__(self, k, v, c1, c2, step: PagedStep, backend: str | None):
        self.k, self.v, self.c1, self.c2, self.step, self.backend = k, v, c1, c2, step, backend

    # torch.compile of a decode step fuses the model's elementwise work around this call and leaves the paged
    # kernels (and their host-side routing) as they are
    @torch.compiler.disable
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: StepMeta,
               sparse: SparseConfig | None) -> torch.Tensor:
        """q [1, T, HQ, D], k/v [1, T, H, D] post-RoPE for the packed step -> o [1, T, HQ, D]."""
        st = self.step
        store_kv(self.k, self.v, k[0], v[0], st.slot_mapping)
        if sparse is not None and self.c1 is not None:
            self._append_compressed(sparse)
        if meta.attention == "sparse" and sparse is not None:
            sparse = _always_sparse(sparse)
        o = torch.empty_like(q[0])
        if st.decode_only:
            o[:] = self._decode(q[0], list(range(len(st.q_lens))), sparse)
            return o[None]
        dec = [i for i, (n, p) in enumerate(zip(st.q_lens, st.past_lens)) if n == 1 and p > 0]
        if dec:
            rows = _index(st, "starts", [st.starts[i] for i in dec], q.device)
            o[rows] = self._decode(q[0, rows], dec, sparse)
        decset = set(dec)
        for i, (s, n, p) in enumerate(zip(st.starts, st.q_lens, st.past_lens)):
            if i not in decset and n > 0:
                o[s: s + n] = self._prefill(q[:, s: s + n], k[:, s: s + n], v[:, s: s + n], i, p, sparse)[0]
        return o[None]

    def _append_compressed(self, sc: SparseConfig) -> None:
        st = self.step
        pairs = [(self.c1, sc.kernel_size, sc.kernel_stride)]
        if self.c2 is not None:
            pairs.append((self.c2, sc.lse_kernel_size, sc.lse_kernel_stride))
        for c, ks, stride in pairs:
            if st.decode_only:
                append_compressed_decode(self.k, c, st.block_tables, st.seq_lens, ks, stride)
                continue
            for i, (p, t) in enumerate(zip(st.past_lens, st.total_lens)):
                append_compressed(self.k, c, st.block_tables[i], p, t, ks, stride)

    def _prefill(self, q, k, v, i: int, past: int, sparse: SparseConfig | None) -> torch.Tensor:
        """One sequence's chunk: q/k/v [1, n, *, D] at positions past.. (its earlier keys are in the pages)."""
        table, L = self.step.block_tables[i], past + q.shape[1]
        kk, vv = (k, v) if past == 0 else (gather_kv(self.k, table, L)[None], gather_kv(self.v, table, L)[None])
        if not self.step.sparse_rows[i]:
            return prefill_attention(q, kk, vv, past, self.backend)
        if past == 0 or resolve_backend(self.backend, q) != "naive":
            return infllmv2_attention(q, kk, vv, sparse, backend=self.backend)
        # the contiguous cache runs a cached chunk through the decode entry; the same call gives the same numbers
        return infllmv2_decode(q, kk, vv, torch.tensor([L], device=q.device), sparse, backend=self.backend)

    def _decode(self, q: torch.Tensor, rows: list[int], sparse: SparseConfig | None) -> torch.Tensor:
        """q [R, HQ, D]: one token for each sequence in rows."""
        st = self.step
        flags = [st.sparse_rows[i] for i in rows]
        every = len(rows) == len(st.q_lens)
        sel = slice(None) if every else _index(st, "rows", rows, q.device)
        tables, lens = st.block_tables[sel], st.seq_lens[sel]
        # a decode-only step may be a replayed graph whose host lists are placeholders: lengths from the device
        host = None if st.decode_only else [st.past_lens[i] + st.q_lens[i] for i in rows]
        if not any(flags):
            return paged_decode_attention(q, self.k, self.v, tables, lens, host_lens=host, backend=self.backend)
        if all(flags):
            return self._sparse_decode(q, tables, lens, host, sparse)
        out = torch.empty_like(q)
        for want in (False, True):
            part = [j for j, f in enumerate(flags) if f == want]
            idx = _index(st, f"part{want}", part, q.device)
            hl = None if host is None else [host[j] for j in part]
            out[idx] = (self._sparse_decode(q[idx], tables[idx], lens[idx], hl, sparse) if want else
                        paged_decode_attention(q[idx], self.k, self.v, tables[idx], lens[idx], host_lens=hl,
                                               backend=self.backend))
        return out

    def _sparse_decode(self, q, tables, lens, host, sc: SparseConfig) -> torch.Tensor:
        if resolve_backend(self.backend, q) == "naive":
            out = torch.empty_like(q)
            for b, L in enumerate(host if host is not None else lens.tolist()):
                kk, vv = gather_kv(self.k, tables[b], L)[None], gather_kv(self.v, tables[b], L)[None]
                seqlens = torch.tensor([L], dtype=torch.int32, device=q.device)
                out[b] = infllmv2_decode(q[b][None, None], kk, vv, seqlens, sc, backend=self.backend)[0, 0]
            return out
        from ..ops.infllmv2.naive import selection_width
        from ..ops.infllmv2.select import decode_infllmv2_select
        cap = tables.shape[1] * self.k.shape[1]
        n1 = max(1, (cap - sc.kernel_size) // sc.kernel_stride + 1)
        c1 = gather_compressed(self.c1, tables, n1, sc.kernel_size, sc.kernel_stride)
        c2 = None
        if self.c2 is not None:
            n2 = max(1, (cap - sc.lse_kernel_size) // sc.lse_kernel_stride + 1)
            c2 = gather_compressed(self.c2, tables, n2, sc.lse_kernel_size, sc.lse_kernel_stride)
        idx = decode_infllmv2_select(q[:, None], c1, c2, lens, sc, selection_width(sc, cap))[:, 0]  # [B, H, W]
        if sc.variant == "v1":
            idx = _with_window(idx, lens, sc, cap)
        return paged_decode_attention(q, self.k, self.v, tables, lens, block_idx=idx, block_size=sc.block_size,
                                      backend=self.backend)


def _index(step: PagedStep, key: str, values: list[int], device) -> torch.Tensor:
    """A device index tensor built once per step and shared by every layer."""
    if key not in step._memo:
        step._memo[key] = torch.tensor(values, device=device)
    return step._memo[key]


def _with_window(idx: torch.Tensor, lens: torch.Tensor, sc: SparseConfig, cap: int) -> torch.Tensor:
    """v1: stage 2 attends the local window on top of the top-k; merge both into one ascending, -1 padded list."""
    B, H, W = idx.shape
    nb = -(-cap // sc.block_size)
    keep = torch.zeros(B, H, nb + 1, dtype=torch.bool, device=idx.device)
    keep.scatter_(-1, torch.where(idx < 0, nb, idx).long(), True)
    qb = ((lens.long() - 1) // sc.block_size)[:, None, None]
    blk = torch.arange(nb, device=idx.device)[None, None]
    keep[..., :nb] |= (blk > qb - sc.local_blocks) & (blk <= qb)
    order = torch.where(keep[..., :nb], blk, nb).sort(-1).values[..., : W + sc.local_blocks]
    return torch.where(order >= nb, -1, order).to(torch.int32)


def _always_sparse(cfg: SparseConfig) -> SparseConfig:
    return cfg if cfg.dense_len == -1 else replace(cfg, dense_len=-1)
