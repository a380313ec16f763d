"""Independent conformance check against Hugging Face transformers' LlamaForCausalLM (torchtitan style: logits,
softmax KL and greedy-decode identity).

MiniCPM4 is a Llama decoder plus μP scalars, and all three fold into weights exactly in real arithmetic:
embed_tokens x scale_emb, o_proj and down_proj x scale_depth/sqrt(L), and lm_head = (embedding or lm_head) /
(hidden/dim_model_base), untied in Llama. RMSNorm is the same. RoPE: Llama's default rope for MiniCPM-1 style
configs; transformers' "longrope" for MiniCPM4: inv_freq / ext with ext = long_factor when max(position)+1 >
original_max_position_embeddings, and cos/sin scaled by attention_factor, which transformers derives as
sqrt(1 + ln(max_pos/orig)/ln(orig)) when max_pos > orig and 1.0 otherwise: the same m as MiniCPM's LongRoPE.
Skipped when transformers is not installed (it is not a dependency of longcpm).
"""

from __future__ import annotations

import math

import pytest
import torch

# transformers >= 5 takes RoPE settings as `rope_parameters` (4.x used rope_scaling + top-level rope_theta)
transformers = pytest.importorskip("transformers", minversion="5.0")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

V_SMALL = 1024


def llama_from_minicpm(model, *, attention_factor: float | None = None) -> LlamaForCausalLM:
    cfg = model.config
    if cfg.rope_scaling.rope_type == "default":
        rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    else:
        assert cfg.rope_scaling.rope_type == "longrope"
        rope = {"rope_type": "longrope", "rope_theta": float(cfg.rope_theta),
                "short_factor": list(cfg.rope_scaling.short_factor),
                "long_factor": list(cfg.rope_scaling.long_factor),
                "original_max_position_embeddings": cfg.rope_scaling.original_max_position_embeddings}
        if attention_factor is not None:
            rope["attention_factor"] = attention_factor
    lc = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, rope_parameters=rope,
    )
    llama = LlamaForCausalLM._from_config(lc, attn_implementation="eager").eval()

    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    alpha = cfg.scale_depth / math.sqrt(cfg.num_hidden_layers)
    emb = sd["model.embed_tokens.weight"]
    head = emb if cfg.tie_word_embeddings else sd["lm_head.weight"]
    sd["lm_head.weight"] = head / (cfg.hidden_size / cfg.dim_model_base)
    sd["model.embed_tokens.weight"] = emb * cfg.scale_emb
    for i in range(cfg.num_hidden_layers):
        for name in (f"model.layers.{i}.self_attn.o_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"):
            sd[name] = sd[name] * alpha
    missing, unexpected = llama.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return llama


def kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """max over positions of KL(softmax(ref) || softmax(ours)), fp64."""
    lp, lq = ref_logits.double().log_softmax(-1), logits.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).max().item()


def assert_logits_match(ours: torch.Tensor, ref: torch.Tensor):
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 1e-4 * max(1.0, scale)
    assert kl(ref, ours) < 1e-6


VARIANTS = {
    # MiniCPM-1/2 style: MHA, plain rope with a non-default theta, no rope_scaling, tied
    "minicpm1-plain-rope": dict(rope_scaling=None, kv_heads=4, rope_theta=50000.0),
    # MiniCPM4-0.5B shape: GQA, LongRoPE with the real (sliced) factors, max_pos == orig (m = 1), tied
    "minicpm4-longrope-tied": dict(),
    "minicpm4-longrope-untied": dict(tie_word_embeddings=False),
    # long != short and a short orig_max, so that sequences past it use the long set; m = 1
    "longrope-long-set": dict(rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 16,
                                            "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0],
                                            "long_factor": [1.0, 2.0, 4.0, 8.0, 12.0, 20.0, 30.0, 50.0]},
                              max_position_embeddings=16),
    # max_pos = 4 x orig: m = sqrt(1 + ln 4 / ln 16) != 1
    "longrope-m>1": dict(rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 16,
                                       "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0],
                                       "long_factor": [1.0, 2.0, 4.0, 8.0, 12.0, 20.0, 30.0, 50.0]},
                         max_position_embeddings=64),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_llama(tiny_model, variant):
    model = tiny_model(seed=21, vocab=V_SMALL, layers=3, **VARIANTS[variant])
    llama = llama_from_minicpm(model)
    for T in (12, 16, 17, 24):  # orig is 16 in the small-orig variants: 16 is short, 17 and 24 long
        ids = torch.randint(0, V_SMALL, (2, T))
        with torch.no_grad():
            ours = model(ids)
            ref = llama(ids).logits.float()
        assert_logits_match(ours, ref)


def test_logits_match_llama_real_vocab(tiny_model):
    model = tiny_model(seed=22, tie_word_embeddings=False)
    assert model.config.vocab_size == 73448
    llama = llama_from_minicpm(model)
    ids = torch.randint(0, 73448, (1, 16))
    with torch.no_grad():
        assert_logits_match(model(ids), llama(ids).logits.float())


def test_attention_factor_matches_minicpm_m(tiny_model):
    """transformers' derived longrope attention_factor equals MiniCPM's m; pinning it to 1.0 is the same for the
    shipped configs (max_pos == orig) and different (hence observable) when max_pos > orig."""
    shipped = tiny_model(seed=23, vocab=V_SMALL)
    assert shipped.config.max_position_embeddings == shipped.config.rope_scaling.original_max_position_embeddings
    assert llama_from_minicpm(shipped).model.rotary_emb.attention_scaling == 1.0
    ids = torch.randint(0, V_SMALL, (1, 10))
    with torch.no_grad():
        assert_logits_match(shipped(ids), llama_from_minicpm(shipped, attention_factor=1.0)(ids).logits)

    scaled = tiny_model(seed=24, vocab=V_SMALL, **VARIANTS["longrope-m>1"])
    m = math.sqrt(1 + math.log(64 / 16) / math.log(16))
    assert llama_from_minicpm(scaled).model.rotary_emb.attention_scaling == pytest.approx(m, rel=1e-12)
    with torch.no_grad():
        ours = scaled(ids)
        pinned = llama_from_minicpm(scaled, attention_factor=1.0)(ids).logits
    assert (ours - pinned).abs().max() > 1e-3


def _greedy_ours(model, prompt: torch.Tensor, n: int):
    """Greedy decode with longcpm's KV cache; returns tokens and the logits of each step."""
    cache = model.new_cache(1, prompt.shape[1] + n)
    logits = model(prompt, cache=cache, last_only=True)
    toks, steps = [], []
    for _ in range(n):
        steps.append(logits[0])
        t = int(logits[0].argmax())
        toks.append(t)
        logits = model(torch.tensor([[t]]), cache=cache)[:, -1]
    return toks, torch.stack(steps)


def _greedy_llama(llama, prompt: torch.Tensor, n: int):
    """Greedy decode recomputing the whole sequence each step (no cache on this side)."""
    ids, toks, steps = prompt, [], []
    for _ in range(n):
        logits = llama(ids).logits[0, -1].float()
        steps.append(logits)
        t = int(logits.argmax())
        toks.append(t)
        ids = torch.cat([ids, torch.tensor([[t]])], 1)
    return toks, torch.stack(steps)


@pytest.mark.parametrize("variant", ["minicpm4-longrope-untied", "minicpm4-longrope-tied", "minicpm1-plain-rope"])
def test_greedy_decode_20_tokens_identical(tiny_model, variant):
    model = tiny_model(seed=25, layers=3, **VARIANTS[variant])
    llama = llama_from_minicpm(model)
    prompt = torch.randint(0, model.config.vocab_size, (1, 7))
    with torch.no_grad():
        ours, our_logits = _greedy_ours(model, prompt, 20)
        ref, ref_logits = _greedy_llama(llama, prompt, 20)
    assert ours == ref
    assert kl(ref_logits, our_logits) < 1e-6
    if variant == "minicpm4-longrope-untied":
        assert len(set(ours)) > 3  # not a degenerate repeat of one token
