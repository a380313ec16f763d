"""Memory planning: how many KV pages the engine gets.

On CUDA the pool takes what is left of gpu_memory_utilization x device memory after the weights, whatever else
holds device memory, and the peak of one profiled worst-case step (a full max_num_batched_tokens prefill chunk,
plus the K/V gathered for a chunk at max_model_len and the sampling buffers). A page costs
page_size x (ModelConfig.kv_bytes_per_token + compressed_kv_bytes_per_token). On CPU the size is explicit.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..kvcache.contiguous import StepMeta
from ..kvcache.paged import PagedKVPool, PagedStep
from .config import EngineConfig


def plan_num_pages(model, config: EngineConfig, max_model_len: int) -> int:
    """Pages of the pool, scratch page 0 included."""
    PS = config.page_size
    useful = -(-config.max_num_seqs * max_model_len // PS) + 1  # more than every sequence at full length is waste
    if config.num_pages is not None:
        return config.num_pages + 1
    if config.kv_cache_tokens is not None:
        return -(-config.kv_cache_tokens // PS) + 1
    if model.device.type != "cuda":
        return -(-max(2 * max_model_len, 16384) // PS) + 1
    page = PagedKVPool.page_bytes(model.config, PS, model.dtype)
    free, total = torch.cuda.mem_get_info(model.device)
    other = (total - free) - torch.cuda.memory_reserved(model.device)  # other processes, CUDA context
    held = torch.cuda.memory_allocated(model.device)  # weights
    step = profile_step_bytes(model, config, max_model_len)
    budget = int(total * config.gpu_memory_utilization) - other - held - step
    pages = budget // page
    if pages < 2:
        raise ConfigError(f"no room for a KV cache: {total / 2**30:.1f} GiB x {config.gpu_memory_utilization} minus "
                          f"{held / 2**30:.1f} GiB of weights and {step / 2**30:.1f} GiB for one step leaves "
                          f"{max(budget, 0) / 2**30:.2f} GiB; lower max_num_batched_tokens or raise "
                          f"gpu_memory_utilization")
    return int(min(pages, useful))


@torch.inference_mode()
def profile_step_bytes(model, config: EngineConfig, max_model_len: int) -> int:
    """Peak bytes above the weights of one prefill chunk, measured, plus what the profile cannot see."""
    c, dev, PS = model.config, model.device, config.page_size
    T = min(config.max_num_batched_tokens, max_model_len)
    n = -(-T // PS)
    pool = PagedKVPool(c, n + 1, PS, dev, model.dtype)
    sparse = c.sparse_config is not None and config.attention != "dense" and (
        config.attention == "sparse" or c.sparse_config.is_sparse(T))
    step = PagedStep(q_lens=[T], past_lens=[0], sparse_rows=[sparse],
                     slot_mapping=torch.arange(T, device=dev) + PS,
                     block_tables=torch.arange(1, n + 1, dtype=torch.int32, device=dev)[None],
                     seq_lens=torch.tensor([T], dtype=torch.int32, device=dev))
    ids = torch.zeros(1, T, dtype=torch.long, device=dev)
    meta = StepMeta(positions=torch.arange(T, device=dev)[None], new_lens=[T], past_lens=[0],
                    attention=config.attention)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    h = model.model(ids, meta, pool.view(step, config.attention, config.backend))
    model.logits(h[0, -min(T, config.max_num_seqs):])
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    del pool, h
    torch.cuda.empty_cache()
    b = torch.finfo(model.dtype).bits // 8
    gathered = 2 * max_model_len * c.num_key_value_heads * c.head_dim * b  # K and V of one layer at max length
    sampling = 4 * config.max_num_seqs * c.vocab_size * 4  # fp32 logits, probabilities, sort buffers
    return int(peak + 2 * gathered + sampling + (256 << 20))  # + CUDA graph pool and allocator slack
