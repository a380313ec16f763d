"""GQA self-attention with RoPE, a KV cache, and InfLLM-V2 dense/sparse switching per sequence.

Dense rows go through scaled_dot_product_attention; rows whose total length reaches dense_len (or all rows with
attention="sparse") go through longcpm.ops.infllmv2_attention (prefill) or infllmv2_decode (with a cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from ..config import ModelConfig
from ..errors import ConfigError
from ..kvcache import LayerCache, StepMeta
from ..ops import infllmv2_attention, infllmv2_decode, update_compressed_cache
from ..ops.packed import MASKED_BACKENDS, packed_causal_attention
from .rope import apply_rotary


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sparse = config.sparse_config
        if self.sparse is not None and self.sparse.use_nope:
            raise ConfigError("sparse_config.use_nope = true is not supported by the model yet (the op supports it)")
        bias = config.attention_bias
        hq, hkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, hq, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, hkv, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, hkv, bias=bias)
        self.o_proj = nn.Linear(hq, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: StepMeta,
                cache: LayerCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if getattr(cache, "paged", False):  # a paged cache (kvcache/paged.py) stores and attends over its own layout
            return self.o_proj(cache.attend(q, k, v, meta, self.sparse).reshape(B, T, -1))
        if cache is not None:
            cache.write(k, v, meta)
            if self.sparse is not None:
                update_compressed_cache(cache.k, cache.c1, cache.c2, meta.past_lens, meta.total_lens, self.sparse)
        o = self._attend(q, k, v, meta, cache)
        return self.o_proj(o.reshape(B, T, -1))

    def _sparse_rows(self, meta: StepMeta) -> list[bool]:
        if self.sparse is None or meta.attention == "dense":
            return [False] * len(meta.new_lens)
        if meta.attention == "sparse":
            return [n > 0 for n in meta.new_lens]
        return [n > 0 and self.sparse.is_sparse(t) for n, t in zip(meta.new_lens, meta.total_lens)]

    def _attend(self, q, k, v, meta: StepMeta, cache: LayerCache | None) -> torch.Tensor:
        if meta.cu_seqlens is not None:
            return self._attend_packed(q, k, v, meta)
        sparse_rows = self._sparse_rows(meta)
        if all(sparse_rows):
            o = torch.zeros_like(q)
        else:
            o = self._dense(q, k, v, meta, cache)
        if not any(sparse_rows):
            return o
        cfg = self.sparse if meta.attention != "sparse" else _always_sparse(self.sparse)
        for b, is_sparse in enumerate(sparse_rows):
            if not is_sparse:
                continue
            n, past = meta.new_lens[b], meta.past_lens[b]
            if cache is None or past == 0:
                src_k = k if cache is None else cache.k
                src_v = v if cache is None else cache.v
                o[b, :n] = infllmv2_attention(q[b: b + 1, :n], src_k[b: b + 1, :n], src_v[b: b + 1, :n], cfg)[0]
            else:
                seqlens = torch.tensor([past + n], dtype=torch.int32, device=q.device)
                c2 = cache.c2[b: b + 1] if cache.c2 is not None else None
                o[b, :n] = infllmv2_decode(q[b: b + 1, :n], cache.k[b: b + 1], cache.v[b: b + 1], seqlens, cfg,
                                           c1=cache.c1[b: b + 1], c2=c2)[0]
        return o

    def _attend_packed(self, q, k, v, meta: StepMeta) -> torch.Tensor:
        """Packed documents (B = 1): no attention across documents; the op decides dense/sparse per document."""
        if self.sparse is not None and meta.attention != "dense":
            cfg = self.sparse if meta.attention == "auto" else _always_sparse(self.sparse)
            return infllmv2_attention(q, k, v, cfg, cu_seqlens=meta.cu_seqlens)
        return packed_causal_attention(q, k, v, meta.cu_seqlens)

    def _dense(self, q, k, v, meta: StepMeta, cache: LayerCache | None) -> torch.Tensor:
        qt = q.transpose(1, 2)
        if cache is None and not meta.padded:
            o = F.scaled_dot_product_attention(qt, k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                               enable_gqa=True)
            return o.transpose(1, 2)
        if cache is None:
            kk, vv = k, v
            totals = torch.tensor(meta.new_lens, device=q.device)
        else:
            Tk = max(meta.total_lens)
            kk, vv = cache.k[:, :Tk], cache.v[:, :Tk]
            totals = torch.tensor(meta.total_lens, device=q.device)
        mask = meta.cached("dense_mask", lambda: _dense_mask(meta.positions, totals, kk.shape[1]))
        with sdpa_kernel(MASKED_BACKENDS):  # no cuDNN graph build per new length (ops/packed.py)
            o = F.scaled_dot_product_attention(qt, kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=mask,
                                               enable_gqa=True)
        return o.transpose(1, 2)



def _dense_mask(positions: torch.Tensor, totals: torch.Tensor, Tk: int) -> torch.Tensor:
    """[B, 1, T, Tk] bool: key j visible to the query at positions[b, t] and inside row b's total length."""
    j = torch.arange(Tk, device=positions.device)
    return ((j[None, None, :] <= positions[:, :, None]) & (j[None, None, :] < totals[:, None, None]))[:, None]


def _always_sparse(cfg):
    from dataclasses import replace
    return replace(cfg, dense_len=-1)
