"""Trainable InfLLM-V2 stage 2: an autograd Function over the Triton block-sparse forward (parallel.py) and
backward (backward.py). The block indices are constants: selection has no gradient (spec §5)."""

from __future__ import annotations

import torch

from .backward import parallel_block_sparse_attention_bwd
from .parallel import parallel_block_sparse_attention


class InfLLMV2SparseFunction(torch.autograd.Function):
    """o = block-sparse attention of (q, k, v) over `block_idx`; saves q, k, v, o and the LSE, recomputes the
    probabilities in backward."""

    @staticmethod
    def forward(ctx, q, k, v, block_idx, block_size, window_blocks, cu_seqlens_q, cu_seqlens_k, sm_scale,
                deterministic):
        o, lse = parallel_block_sparse_attention(q, k, v, block_idx, block_size, window_blocks=window_blocks,
                                                 cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                                 sm_scale=sm_scale, return_lse=True)
        ctx.save_for_backward(q, k, v, o, lse, block_idx, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (block_size, window_blocks, sm_scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, block_idx, cu_q, cu_k = ctx.saved_tensors
        block_size, window_blocks, sm_scale = ctx.args
        dq, dk, dv = parallel_block_sparse_attention_bwd(q, k, v, o, lse, do, block_idx, block_size,
                                                         window_blocks=window_blocks, cu_seqlens_q=cu_q,
                                                         cu_seqlens_k=cu_k, sm_scale=sm_scale)
        return dq, dk, dv, None, None, None, None, None, None, None


def sparse_attention_with_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                               block_size: int, *, window_blocks: int = 0, cu_seqlens_q: torch.Tensor | None = None,
                               cu_seqlens_k: torch.Tensor | None = None, sm_scale: float | None = None,
                               deterministic: bool = False) -> torch.Tensor:
    """parallel_block_sparse_attention with gradients for q, k, v (same arguments and result). Without a
    gradient to compute (no input requires one, or grad mode is off) it is the plain forward.

    The backward never uses atomics (the key-block -> query-token transpose is built by sorting and split lists
    are reduced in a fixed order), so its gradients are bit-equal from run to run whatever `deterministic` says;
    the flag is kept so callers can state the requirement."""
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return parallel_block_sparse_attention(q, k, v, block_idx, block_size, window_blocks=window_blocks,
                                               cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                               sm_scale=sm_scale)
    if cu_seqlens_q is not None and cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    return InfLLMV2SparseFunction.apply(q, k, v, block_idx.detach(), block_size, window_blocks, cu_seqlens_q,
                                        cu_seqlens_k, sm_scale, deterministic)
