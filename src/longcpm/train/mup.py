"""μP optimizer parameter groups and init scaling for MiniCPM models (../shared/spec/training.md §2).

The forward-pass μP constants (scale_emb, scale_depth/√L, logits ÷ hidden/dim_model_base) live in the model; this
file holds what only training needs. Both rules below are marked (unverified) in the spec, so each is a single
documented function and can be switched off:

- learning rate: hidden matrices (every 2-D weight inside the decoder layers) get lr × dim_model_base/hidden;
- init: hidden matrices get std = initializer_range / √(hidden/dim_model_base).

Embeddings (and an untied lm_head, whose μP output multiplier is already applied in the forward pass), norms and
biases keep the base lr and get no weight decay.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig

GROUPS = ("hidden", "embed", "vector")


def width_multiplier(config: ModelConfig) -> float:
    """hidden / dim_model_base (1 when the config has no dim_model_base, i.e. no μP)."""
    return config.hidden_size / config.dim_model_base if config.dim_model_base else 1.0


def hidden_lr_scale(config: ModelConfig, enabled: bool = True) -> float:
    """μP lr multiplier of hidden matrices under Adam: 1/width multiplier = dim_model_base/hidden (unverified)."""
    return 1.0 / width_multiplier(config) if enabled else 1.0


def hidden_init_std(config: ModelConfig, enabled: bool = True) -> float:
    """Init std of hidden matrices: initializer_range / √(width multiplier) (unverified)."""
    std = config.initializer_range
    return std / math.sqrt(width_multiplier(config)) if enabled else std


def param_group_of(name: str, p: torch.Tensor) -> str:
    """'hidden' for 2-D weights inside decoder layers, 'embed' for the embedding and lm_head, 'vector' otherwise."""
    if name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight"):
        return "embed"
    if p.dim() >= 2 and ".layers." in f".{name}":
        return "hidden"
    return "vector"


def mup_param_groups(model: nn.Module, lr: float, weight_decay: float, *, config: ModelConfig | None = None,
                     mup: bool = True) -> list[dict]:
    """AdamW param groups: [hidden (lr × hidden_lr_scale, weight decay), embed (lr, no decay), vector (lr, no
    decay)]. Each group carries 'name' and 'lr_scale'. Tied weights appear once (named_parameters dedups)."""
    config = config or model.config
    buckets: dict[str, list[torch.Tensor]] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets[param_group_of(name, p)].append(p)
    scale = hidden_lr_scale(config, mup)
    spec = {"hidden": (scale, weight_decay), "embed": (1.0, 0.0), "vector": (1.0, 0.0)}
    return [{"params": buckets[g], "lr": lr * spec[g][0], "weight_decay": spec[g][1], "name": g,
             "lr_scale": spec[g][0]} for g in GROUPS if buckets[g]]


def mup_init_(model: nn.Module, seed: int, *, config: ModelConfig | None = None, scale_hidden: bool = True) -> None:
    """Fresh init: normal(0, initializer_range) for embeddings, normal(0, hidden_init_std) for hidden matrices,
    ones for norms, zeros for biases. Drawn in named_parameters order from one CPU generator, so it is the same
    on every device and every rank."""
    config = config or model.config
    g = torch.Generator(device="cpu").manual_seed(seed)
    std_h = hidden_init_std(config, scale_hidden)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                std = std_h if param_group_of(name, p) == "hidden" else config.initializer_range
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
