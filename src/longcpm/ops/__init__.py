"""Pure tensor functions (torch + triton). Nothing here knows about nn.Modules, models or the engine."""

from .infllmv2 import (
    infllmv2_attention,
    infllmv2_decode,
    infllmv2_select,
    update_compressed_cache,
)

__all__ = ["infllmv2_attention", "infllmv2_decode", "infllmv2_select", "update_compressed_cache"]
