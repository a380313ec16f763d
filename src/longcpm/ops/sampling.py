"""Next-token sampling on logits [B, V]: greedy, temperature, top-k, top-p, min-p, with per-row parameters.

Filters run in Hugging Face's order (temperature, top-k, top-p, min-p). Each sampled row draws its noise from its
own torch.Generator, so a seeded request gets the same tokens whatever else shares its batch.
Knows nothing of requests, tokenizers or the engine.
"""

from __future__ import annotations

import torch


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B] int64, the highest-scoring token of each row."""
    return logits.argmax(dim=-1)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Set the logits of tokens outside each row's top-k / top-p nucleus / min-p floor to -inf.

    logits [B, V] float; top_k [B] int (<= 0: off); top_p [B] float in (0, 1] (1: off); min_p [B] float (0: off).
    The best token always survives, so every row keeps a valid distribution.
    """
    B, V = logits.shape
    neg_inf = torch.finfo(logits.dtype).min
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
        rank = torch.arange(V, device=logits.device)
        k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
        sorted_logits = sorted_logits.masked_fill(rank[None, :] >= k[:, None], neg_inf)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the mass of the tokens ranked above it already reaches top_p
        before = probs.cumsum(dim=-1) - probs
        cut = (before >= top_p[:, None].to(probs.dtype)) & (top_p < 1)[:, None]
        sorted_logits = sorted_logits.masked_fill(cut, neg_inf)
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        floor = probs.max(dim=-1, keepdim=True).values * min_p[:, None].to(probs.dtype)
        logits = logits.masked_fill(probs < floor, neg_inf)
    return logits


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           min_p: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row. logits [B, V] (float32), per-row params [B]; temperature 0 means greedy for that row.

    generators[b] seeds row b's draw (None: torch's global RNG); greedy rows draw nothing.
    """
    B = logits.shape[0]
    if len(generators) != B:
        raise ValueError(f"need {B} generators (or None entries), got {len(generators)}")
    is_greedy = temperature <= 0
    if bool(is_greedy.all()):
        return greedy(logits)
    logits = logits.float()
    scaled = logits / torch.where(is_greedy, torch.ones_like(temperature), temperature)[:, None].float()
    probs = filter_logits(scaled, top_k, top_p, min_p).softmax(dim=-1)
    # argmax(p / E) with E ~ Exp(1) is a draw from p; one noise row per sampled request keeps rows independent
    noise = torch.ones_like(probs)
    for b in torch.nonzero(~is_greedy).flatten().tolist():
        noise[b].exponential_(generator=generators[b])
    drawn = (probs / noise).argmax(dim=-1)
    return torch.where(is_greedy, greedy(logits), drawn)
