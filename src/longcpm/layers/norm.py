"""RMSNorm as MiniCPM computes it: variance in fp32, cast back to the input dtype, then times the weight."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        # the cast happens before the weight multiply (HF order); changing it changes bf16 logits
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight
