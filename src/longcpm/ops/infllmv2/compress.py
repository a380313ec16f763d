"""Mean-pooled compressed keys (InfLLM-V2 c1 / c2) in Triton: whole sequences and the incremental decode append.

Window i of (kernel, stride) covers keys [i*stride, i*stride + kernel) and exists iff i*stride + kernel <= L
(complete windows only). Sums run in fp32; the result is stored in the keys' dtype. Knows nothing of scores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def compress_fwd_kernel(
    k,
    c,
    cu_seqlens,
    cu_c,
    T,
    N,
    H: tl.constexpr,
    D: tl.constexpr,
    KS: tl.constexpr,
    S: tl.constexpr,
    BC: tl.constexpr,
    BD: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_c, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_b)
        T = tl.load(cu_seqlens + i_b + 1) - bos
        cos = tl.load(cu_c + i_b)
    else:
        bos = i_b * T
        cos = i_b * N
    n = tl.where(T >= KS, (T - KS) // S + 1, 0)
    if i_c * BC >= n:
        return
    o_c = i_c * BC + tl.arange(0, BC)
    o_d = tl.arange(0, BD)
    m_c = o_c < n
    m_cd = m_c[:, None] & (o_d < D)[None, :]
    # [BC, BD]
    p_k = k + ((bos + o_c * S).to(tl.int64) * H + i_h)[:, None] * D + o_d[None, :]
    b_c = tl.zeros([BC, BD], dtype=tl.float32)
    for e in range(KS):
        b_c += tl.load(p_k + e * H * D, mask=m_cd, other=0.).to(tl.float32)
    b_c = b_c / KS
    p_c = c + ((cos + o_c).to(tl.int64) * H + i_h)[:, None] * D + o_d[None, :]
    tl.store(p_c, b_c.to(c.dtype.element_ty), mask=m_cd)


@triton.jit
def compress_append_kernel(
    k_cache,
    c_cache,
    old_lens,
    new_lens,
    T_max,
    N_max,
    H: tl.constexpr,
    D: tl.constexpr,
    KS: tl.constexpr,
    S: tl.constexpr,
    BKS: tl.constexpr,
    BD: tl.constexpr,
):
    i_w, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    L0 = tl.load(old_lens + i_b).to(tl.int32)
    L1 = tl.load(new_lens + i_b).to(tl.int32)
    n0 = tl.where(L0 >= KS, (L0 - KS) // S + 1, 0)
    n1 = tl.where(L1 >= KS, (L1 - KS) // S + 1, 0)
    w = n0 + i_w
    o_e = tl.arange(0, BKS)
    o_d = tl.arange(0, BD)
    # masks, not an early return: the grid is fixed by the caller's bound, most programs write nothing
    # scalar booleans broadcast into masks upset the interpreter: fold validity into the bounds instead
    n_e = tl.where((w < n1) & (w < N_max), KS, 0)
    n_d = tl.where(n_e > 0, D, 0)
    m_ed = (o_e < n_e)[:, None] & (o_d < n_d)[None, :]
    p_k = k_cache + ((i_b * T_max + w * S + o_e).to(tl.int64) * H + i_h)[:, None] * D + o_d[None, :]
    b_c = tl.sum(tl.load(p_k, mask=m_ed, other=0.).to(tl.float32), 0) / KS
    p_c = c_cache + ((i_b * N_max + w).to(tl.int64) * H + i_h) * D + o_d
    tl.store(p_c, b_c.to(c_cache.dtype.element_ty), mask=o_d < n_d)


def compressed_lens(lens: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    return torch.where(lens >= kernel, torch.div(lens - kernel, stride, rounding_mode="floor") + 1,
                       torch.zeros_like(lens))


def compress_keys(k: torch.Tensor, kernel: int, stride: int, *, cu_seqlens: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean of k over windows [stride*i, stride*i + kernel), complete windows only, per kv head.

    k [B, T, H, D] -> (c [B, n, H, D], None) with n = floor((T - kernel)/stride) + 1 (0 if T < kernel);
    packed k [1, T, H, D] with cu_seqlens int32 [N+1] -> (c [1, sum n_i, H, D], cu_c int32 [N+1]).
    The packed form reads cu_seqlens on the host once (prefill only; decode uses `append_compressed`).
    """
    B, T, H, D = k.shape
    k = k.contiguous()
    BD = triton.next_power_of_2(D)
    BC = 32 if BD <= 128 else 16
    if cu_seqlens is None:
        n = 0 if T < kernel else (T - kernel) // stride + 1
        c = torch.empty(B, n, H, D, dtype=k.dtype, device=k.device)
        if n > 0:
            compress_fwd_kernel[(triton.cdiv(n, BC), H, B)](
                k, c, k, k, T, n, H=H, D=D, KS=kernel, S=stride, BC=BC, BD=BD, IS_VARLEN=False)
        return c, None
    if B != 1:
        raise ValueError("packed sequences (cu_seqlens) need B = 1")
    cu = cu_seqlens.to(device=k.device, dtype=torch.int32)
    lens = cu[1:] - cu[:-1]
    n_seq = compressed_lens(lens, kernel, stride)
    cu_c = torch.zeros_like(cu)
    torch.cumsum(n_seq, 0, out=cu_c[1:])
    n_list = n_seq.tolist()
    total, n_max = sum(n_list), max(n_list, default=0)
    c = torch.empty(1, total, H, D, dtype=k.dtype, device=k.device)
    if n_max > 0:
        compress_fwd_kernel[(triton.cdiv(n_max, BC), H, len(n_list))](
            k, c, cu, cu_c, T, 0, H=H, D=D, KS=kernel, S=stride, BC=BC, BD=BD, IS_VARLEN=True)
    return c, cu_c


def append_compressed(k_cache: torch.Tensor, c_cache: torch.Tensor, old_lens: torch.Tensor, new_lens: torch.Tensor,
                      kernel: int, stride: int, max_new_windows: int) -> None:
    """Write the windows of row b that became complete when its key count grew from old_lens[b] to new_lens[b].

    k_cache [B, Tmax, H, D]; c_cache [B, Nmax, H, D] (written in place); old_lens / new_lens int device tensors [B].
    `max_new_windows` bounds the new windows of any row (ceil(new_tokens / stride) + 1 always suffices); the grid
    depends on it and on the shapes only, so the call has no host synchronisation and can be graph-captured.
    """
    B, T_max, H, D = k_cache.shape
    N_max = c_cache.shape[1]
    if max_new_windows <= 0 or N_max == 0:
        return
    assert k_cache.is_contiguous() and c_cache.is_contiguous(), "caches must be contiguous"
    BD = triton.next_power_of_2(D)
    compress_append_kernel[(max_new_windows, H, B)](
        k_cache, c_cache, old_lens, new_lens, T_max, N_max, H=H, D=D, KS=kernel, S=stride,
        BKS=triton.next_power_of_2(kernel), BD=BD, num_warps=4)
