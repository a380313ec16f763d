"""Rotary position embeddings of the MiniCPM family: plain, linear, dynamic-NTK and LongRoPE.

cos/sin are computed in fp32 from absolute positions on every call (no growing cache), and the rotation
runs in fp32 before casting back, as the reference modeling code does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dim = config.head_dim
        self.base = float(config.rope_theta)
        self.max_pos = config.max_position_embeddings
        rs = config.rope_scaling
        self.rope_type = rs.rope_type
        self.factor = rs.factor
        self.scaling = rs
        if rs.rope_type == "longrope":
            self.orig_max = rs.original_max_position_embeddings
            scale = self.max_pos / self.orig_max
            self.attn_scale = math.sqrt(1 + math.log(scale) / math.log(self.orig_max)) if scale > 1 else 1.0
        else:
            self.attn_scale = 1.0
        self.reset_buffers()

    def reset_buffers(self, device=None) -> None:
        """(Re)build the fp32 tables; the checkpoint loader calls this after building the model on 'meta'."""
        rs = self.scaling
        self.register_buffer("inv_freq", self._inv_freq(self.base, device), persistent=False)
        if rs.rope_type == "longrope":
            for name, f in (("short_inv_ext", rs.short_factor), ("long_inv_ext", rs.long_factor)):
                self.register_buffer(name, 1.0 / torch.tensor(f, dtype=torch.float32, device=device), persistent=False)

    def _inv_freq(self, base: float, device=None) -> torch.Tensor:
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))

    def _apply(self, fn, recurse=True):
        # model.to(bf16) must not round the angle tables: rebuild them in fp32 on the new device
        super()._apply(fn, recurse)
        self.reset_buffers(self.inv_freq.device)
        return self

    @property
    def factors_differ(self) -> bool:
        return self.rope_type == "longrope" and self.scaling.long_factor != self.scaling.short_factor

    def forward(self, positions: torch.Tensor, totals) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (int) -> cos, sin [B, T, dim] fp32. totals: each row's total length (cache included), or
        one int for all rows; LongRoPE picks its factor set per row by it, dynamic NTK its base by the longest."""
        t = positions.float()
        inv_freq = self.inv_freq.to(positions.device)
        longest = totals if isinstance(totals, int) else max(totals)
        if self.rope_type == "longrope":
            freqs = (t[..., None] * self._inv_ext(totals, positions)) * inv_freq
        elif self.rope_type == "linear":
            freqs = (t / self.factor)[..., None] * inv_freq
        elif self.rope_type == "dynamic" and longest > self.max_pos:
            base = self.base * ((self.factor * longest / self.max_pos) - (self.factor - 1)) ** (self.dim / (self.dim - 2))
            freqs = t[..., None] * self._inv_freq(base, positions.device)
        else:
            freqs = t[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.attn_scale, emb.sin() * self.attn_scale

    def _inv_ext(self, totals, positions: torch.Tensor) -> torch.Tensor:
        short, long = self.short_inv_ext.to(positions.device), self.long_inv_ext.to(positions.device)
        if isinstance(totals, int) or not self.factors_differ:
            longest = totals if isinstance(totals, int) else max(totals)
            return long if longest > self.orig_max else short
        use_long = torch.tensor([n > self.orig_max for n in totals], device=positions.device)
        return torch.where(use_long[:, None, None], long, short)  # [B, 1, dim/2]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos/sin [B, T, D] fp32. NeoX half layout, fp32 math, result in x's dtype."""
    xf = x.float()
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return (xf * c + rotate_half(xf) * s).to(x.dtype)
