"""KV caches: where keys, values and InfLLM-V2 compressed keys live between steps."""

from .contiguous import KVCache, LayerCache, StepMeta

__all__ = ["KVCache", "LayerCache", "StepMeta"]
