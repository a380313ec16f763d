"""EngineConfig: the knobs of the serving engine (batching, KV pool size, CUDA graphs), validated once."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass
class EngineConfig:
    """max_num_seqs: sequences decoded together; max_num_batched_tokens: tokens per step (a longer prompt is
    prefilled in chunks of at most this many). KV pool size, first match wins: num_pages, kv_cache_tokens, else on
    CUDA gpu_memory_utilization of the device minus weights and a profiled step, on CPU 2 x max_model_len tokens.
    cuda_graphs: capture decode steps per batch-size bucket (None: on when the device is CUDA). compile:
    torch.compile the captured decode step (CUDA only, opt-in). attention: "auto" | "dense" | "sparse"."""

    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    page_size: int = 64
    num_pages: int | None = None
    kv_cache_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    cuda_graphs: bool | None = None
    compile: bool = False
    attention: str = "auto"
    backend: str | None = None  # ops backend override ("naive" | "torch" | "triton"); None picks by device

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "page_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"EngineConfig.{name} must be a positive integer, got {v!r}")
        for name in ("num_pages", "kv_cache_tokens", "max_model_len"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"EngineConfig.{name} must be a positive integer or None, got {v!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"EngineConfig.gpu_memory_utilization must be in (0, 1], got "
                              f"{self.gpu_memory_utilization!r}")
        if self.attention not in ("auto", "dense", "sparse"):
            raise ConfigError(f"attention must be 'auto', 'dense' or 'sparse', got {self.attention!r}")
