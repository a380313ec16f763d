"""The MiniCPM / MiniCPM4 decoder (../shared/spec/minicpm4.md §2-5) with Hugging Face parameter names.

μP: embeddings × scale_emb, every residual branch × scale_depth/√layers, final hidden ÷ (hidden/dim_model_base)
before lm_head. Attention is dense unless the config has a sparse_config (InfLLM-V2, see layers/attention.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import ModelConfig
from ...errors import RequestError
from ...kvcache import KVCache, StepMeta
from ...layers.attention import Attention
from ...layers.mlp import SwiGLU
from ...layers.norm import RMSNorm
from ...layers.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.alpha = config.residual_scale

    def forward(self, h, cos, sin, meta, cache=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta, cache) * self.alpha
        return h + self.mlp(self.post_attention_layernorm(h)) * self.alpha


class MiniCPM4Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor, meta: StepMeta, cache: KVCache | None = None) -> torch.Tensor:
        h = self.embed_tokens(input_ids) * self.config.scale_emb
        if meta.cu_seqlens is not None:
            totals = int((meta.cu_seqlens[1:] - meta.cu_seqlens[:-1]).max())
        else:
            totals = meta.total_lens
            if cache is not None and self.rotary_emb.factors_differ:
                self._check_no_factor_switch(meta)
        cos, sin = self.rotary_emb(meta.positions, totals)
        for i, layer in enumerate(self.layers):
            lc = cache[i] if cache is not None else None
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, meta, lc, use_reentrant=False)
            else:
                h = layer(h, cos, sin, meta, lc)
        return self.norm(h)


    def _check_no_factor_switch(self, meta: StepMeta) -> None:
        """LongRoPE with long != short factors picks the set by the total length, so a cached sequence that crosses
        original_max_position_embeddings would need every cached key (of every layer) recomputed: refuse instead of
        silently mixing rotations as the HF code does (spec §4 pitfall). No shipped MiniCPM config has long != short."""
        orig = self.rotary_emb.orig_max
        for b, (past, total) in enumerate(zip(meta.past_lens, meta.total_lens)):
            if 0 < past <= orig < total:
                raise RequestError(
                    f"sequence {b}: its total length crosses original_max_position_embeddings ({orig}) while cached, "
                    f"and this checkpoint's LongRoPE long_factor differs from short_factor; prefill the whole "
                    f"sequence again (or keep prompts + new tokens on one side of {orig})")


class MiniCPM4ForCausalLM(nn.Module):
    """Call with input_ids [B, T] -> float32 logits [B, T, vocab].

    Optional: past_lens/new_lens (right-padded rows of a batch), a KVCache to read and extend, attention mode
    ("auto" | "dense" | "sparse"), and last_only=True to compute logits only at each row's last real token
    ([B, vocab]).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = MiniCPM4Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, *, cache: KVCache | None = None, past_lens=None, new_lens=None,
                attention: str = "auto", last_only: bool = False, cu_seqlens: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if attention not in ("auto", "dense", "sparse"):
            raise ValueError(f"attention must be 'auto', 'dense' or 'sparse', got {attention!r}")
        if cu_seqlens is not None:
            if B != 1 or cache is not None:
                raise ValueError("packed sequences (cu_seqlens) need B = 1 and no cache")
            meta = StepMeta.packed(cu_seqlens, T, input_ids.device, attention)
            h = self.model(input_ids, meta)
            return h if return_hidden else self.lm_head(h / self.config.logit_divisor).float()
        if past_lens is None and cache is not None:
            past_lens = cache.lens
        meta = StepMeta.build(B, T, input_ids.device, past_lens, new_lens, attention)
        if cache is not None:
            cache.check_room(meta.new_lens)
        h = self.model(input_ids, meta, cache)
        if cache is not None:
            cache.advance(meta.new_lens)
        if last_only:
            idx = torch.tensor([max(n - 1, 0) for n in meta.new_lens], device=h.device)
            h = h[torch.arange(B, device=h.device), idx]
        if return_hidden:  # the trainer computes the loss in chunks from the final hidden states
            return h
        return self.lm_head(h / self.config.logit_divisor).float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head with the μP divisor, for callers that asked for return_hidden."""
        return self.lm_head(hidden / self.config.logit_divisor).float()

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, device=p.device, dtype=p.dtype)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def init_weights(self, seed: int | None = None) -> None:
        """Random init as the HF code does: normal(0, initializer_range) for linear and embedding weights,
        ones for norms. Used for tests and random demo checkpoints."""
        g = torch.Generator(device="cpu")
        if seed is not None:
            g.manual_seed(seed)
        std = self.config.initializer_range
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
