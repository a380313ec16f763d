"""A contiguous per-sequence KV cache ([B, Tmax, H, D] per layer) and the per-step metadata contract.

Keys are stored post-RoPE. With a sparse_config the cache also keeps InfLLM-V2's compressed keys c1/c2,
extended incrementally from the new complete windows only (never recompressing the whole cache).
The paged cache of the engine replaces this class; the model sees only LayerCache's methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from ..errors import RequestError


@dataclass
class StepMeta:
    """What one forward step is: per-row positions of its tokens and how many of them are real.

    positions [B, T] absolute positions; rows are right-padded, new_lens[b] real tokens in row b.
    past_lens / total_lens are host lists (tokens in the cache before / after this step).
    attention: "auto" (dense below dense_len, else sparse), "dense" or "sparse" (always sparse).
    """

    positions: torch.Tensor
    new_lens: list[int]
    past_lens: list[int]
    attention: str = "auto"
    # packed documents (B = 1, training): int32 [N+1] offsets; positions restart and attention stays per document
    cu_seqlens: torch.Tensor | None = None
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def cached(self, key: str, build):
        """Per-step values every layer needs (e.g. the dense mask): built once, shared by all layers."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    @property
    def total_lens(self) -> list[int]:
        return [p + n for p, n in zip(self.past_lens, self.new_lens)]

    @property
    def padded(self) -> bool:
        T = self.positions.shape[1]
        return any(n != T for n in self.new_lens)

    @classmethod
    def build(cls, B: int, T: int, device, past_lens=None, new_lens=None, attention: str = "auto") -> StepMeta:
        past = list(past_lens) if past_lens is not None else [0] * B
        new = list(new_lens) if new_lens is not None else [T] * B
        if len(past) != B or len(new) != B:
            raise ValueError(f"past_lens/new_lens need {B} entries")
        if any(n < 0 or n > T for n in new):
            raise ValueError(f"new_lens must lie in [0, {T}], got {new}")
        base = torch.tensor(past, dtype=torch.long, device=device)[:, None]
        positions = base + torch.arange(T, dtype=torch.long, device=device)[None, :]
        return cls(positions=positions, new_lens=new, past_lens=past, attention=attention)

    @classmethod
    def packed(cls, cu_seqlens: torch.Tensor, T: int, device, attention: str = "auto") -> StepMeta:
        cu = cu_seqlens.to(device=device, dtype=torch.int32)
        if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != T or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to the packed length {T}, got {cu.tolist()}")
        starts = torch.repeat_interleave(cu[:-1].long(), (cu[1:] - cu[:-1]).long())
        positions = (torch.arange(T, device=device) - starts)[None]
        return cls(positions=positions, new_lens=[T], past_lens=[0], attention=attention, cu_seqlens=cu)

    def valid_mask(self) -> torch.Tensor:
        """[B, T] bool: which slots of the padded step hold real tokens."""
        T = self.positions.shape[1]
        n = torch.tensor(self.new_lens, device=self.positions.device)
        return torch.arange(T, device=self.positions.device)[None, :] < n[:, None]


class LayerCache:
    """One layer's keys/values (and compressed keys when sparse) for B sequences."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, c1: torch.Tensor | None, c2: torch.Tensor | None):
        self.k, self.v, self.c1, self.c2 = k, v, c1, c2

    def write(self, k: torch.Tensor, v: torch.Tensor, meta: StepMeta) -> None:
        """Store this step's post-RoPE keys and values at their absolute positions (real tokens only)."""
        if not meta.padded:
            for b, p in enumerate(meta.past_lens):
                T = k.shape[1]
                self.k[b, p: p + T] = k[b]
                self.v[b, p: p + T] = v[b]
            return
        for b, (p, n) in enumerate(zip(meta.past_lens, meta.new_lens)):
            self.k[b, p: p + n] = k[b, :n]
            self.v[b, p: p + n] = v[b, :n]


class KVCache:
    """KV cache for a batch of B sequences of at most max_len tokens each."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.bfloat16):
        self.config = config
        self.batch_size = batch_size
        self.max_len = max_len
        H, D = config.num_key_value_heads, config.head_dim
        sc = config.sparse_config
        self.layers: list[LayerCache] = []
        for _ in range(config.num_hidden_layers):
            k = torch.zeros(batch_size, max_len, H, D, device=device, dtype=dtype)
            v = torch.zeros_like(k)
            c1 = c2 = None
            if sc is not None:
                c1 = torch.zeros(batch_size, max_len // sc.kernel_stride + 1, H, D, device=device, dtype=dtype)
                if sc.uses_c2():
                    c2 = torch.zeros(batch_size, max_len // sc.lse_kernel_stride + 1, H, D, device=device, dtype=dtype)
            self.layers.append(LayerCache(k, v, c1, c2))
        self.lens = [0] * batch_size  # tokens held per sequence (host copy; the engine keeps these on device)

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def check_room(self, new_lens: list[int]) -> None:
        for b, (p, n) in enumerate(zip(self.lens, new_lens)):
            if p + n > self.max_len:
                raise RequestError(f"sequence {b}: {p + n} tokens exceed the cache capacity of {self.max_len}")

    def advance(self, new_lens: list[int]) -> None:
        self.lens = [p + n for p, n in zip(self.lens, new_lens)]

    def reset(self) -> None:
        self.lens = [0] * self.batch_size

    def nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            for t in (layer.k, layer.v, layer.c1, layer.c2):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total
