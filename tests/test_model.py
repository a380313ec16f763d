"""The MiniCPM4 decoder against an independent fp64 re-derivation of spec §2-4 (written here with explicit torch
ops, not the library's layers), plus dtypes, tying, the KV cache and the InfLLM-V2 dense/sparse switch."""

from __future__ import annotations

import math

import pytest
import torch

from longcpm.errors import ConfigError, RequestError
from longcpm.layers.norm import RMSNorm
from longcpm.layers.rope import RotaryEmbedding, apply_rotary
from longcpm.models.checkpoint import load_model

V_SMALL = 512  # vocab for tests where the real 73448 only costs time

# A sparse_config small enough for CPU: 8-token blocks, one local block, budget 3 blocks (init + window + 1).
# At 32 tokens (4 blocks) queries in block 3 keep blocks {0, 2, 3} and drop block 1.
SMALL_SPARSE = {"kernel_size": 8, "kernel_stride": 4, "block_size": 8, "init_blocks": 1, "window_size": 8,
                "topk": 2, "dense_len": 32, "lse_kernel_size": 16, "lse_kernel_stride": 8}


@pytest.fixture(autouse=True)
def _naive_backend(monkeypatch):
    # the InfLLM-V2 model-level checks run the PyTorch reference on CPU whatever LONGCPM_BACKEND says
    monkeypatch.setenv("LONGCPM_BACKEND", "naive")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ---- an independent reference forward (spec §2-4), fp64 ------------------------------------------------------


def spec_cos_sin(T_positions: torch.Tensor, cfg, total_len: int):
    """cos, sin [..., D] in fp64 from spec §4 (or plain RoPE when rope_scaling is default)."""
    D = cfg.head_dim
    i = torch.arange(D // 2, dtype=torch.float64)
    inv_freq = cfg.rope_theta ** (-2.0 * i / D)
    rs = cfg.rope_scaling
    m = 1.0
    if rs.rope_type == "longrope":
        orig = rs.original_max_position_embeddings
        ext = torch.tensor(rs.long_factor if total_len > orig else rs.short_factor, dtype=torch.float64)
        inv_freq = inv_freq / ext
        if cfg.max_position_embeddings > orig:
            m = math.sqrt(1 + math.log(cfg.max_position_embeddings / orig) / math.log(orig))
    else:
        assert rs.rope_type == "default"
    ang = T_positions.double()[..., None] * inv_freq  # [..., D/2]
    ang = torch.cat([ang, ang], -1)
    return torch.cos(ang) * m, torch.sin(ang) * m


def spec_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; pair (j, j + D/2) rotated by angle j: (a, b) -> (a cos - b sin, b cos + a sin)."""
    D = x.shape[-1]
    a, b = x[..., : D // 2], x[..., D // 2:]
    c, s = cos[:, :, None, : D // 2], sin[:, :, None, : D // 2]
    return torch.cat([a * c - b * s, b * c + a * s], -1)


def reference_logits(model, ids: torch.Tensor, cfg=None) -> torch.Tensor:
    """Spec §2 forward in fp64 with the model's weights and `cfg`'s scalars. ids [B, T] -> logits [B, T, V]."""
    cfg = cfg or model.config
    W = {k: v.detach().double() for k, v in model.state_dict().items()}
    B, T = ids.shape
    H, KV, D, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    G = H // KV
    eps = cfg.rms_norm_eps

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    cos, sin = spec_cos_sin(torch.arange(T)[None].expand(B, T), cfg, T)
    alpha = cfg.scale_depth / math.sqrt(L)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    h = W["model.embed_tokens.weight"][ids] * cfg.scale_emb
    for i in range(L):
        p = f"model.layers.{i}."
        x = rms(h, W[p + "input_layernorm.weight"])
        q = (x @ W[p + "self_attn.q_proj.weight"].T).view(B, T, H, D)
        k = (x @ W[p + "self_attn.k_proj.weight"].T).view(B, T, KV, D)
        v = (x @ W[p + "self_attn.v_proj.weight"].T).view(B, T, KV, D)
        q, k = spec_rotate(q, cos, sin), spec_rotate(k, cos, sin)
        out = torch.empty(B, T, H, D, dtype=torch.float64)
        for hq in range(H):
            kh, vh = k[:, :, hq // G], v[:, :, hq // G]  # query head hq reads kv head hq // G
            s = torch.einsum("btd,bsd->bts", q[:, :, hq], kh) / math.sqrt(D)
            s = s.masked_fill(~causal, float("-inf"))
            out[:, :, hq] = torch.einsum("bts,bsd->btd", torch.softmax(s, -1), vh)
        h = h + alpha * (out.reshape(B, T, H * D) @ W[p + "self_attn.o_proj.weight"].T)
        x = rms(h, W[p + "post_attention_layernorm.weight"])
        g, u = x @ W[p + "mlp.gate_proj.weight"].T, x @ W[p + "mlp.up_proj.weight"].T
        h = h + alpha * ((g * torch.sigmoid(g) * u) @ W[p + "mlp.down_proj.weight"].T)
    h = rms(h, W["model.norm.weight"])
    head = W["model.embed_tokens.weight"] if cfg.tie_word_embeddings else W["lm_head.weight"]
    return (h / (cfg.hidden_size / cfg.dim_model_base)) @ head.T


# ---- shapes, dtypes, tying ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_logits_fp32_for_every_param_dtype(make_checkpoint, dtype):
    path = make_checkpoint(seed=3)
    model = load_model(path, dtype=dtype)
    want = getattr(torch, dtype)
    assert all(p.dtype == want for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        logits = model(ids)
    assert logits.dtype == torch.float32
    assert logits.shape == (2, 7, 73448) == (2, 7, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    if dtype != "float32":
        with torch.no_grad():
            ref = load_model(path, dtype="float32")(ids)
        assert rel_err(logits, ref) < 5e-2  # same model, lower precision


def test_rope_tables_stay_fp32_after_module_to(tiny_model):
    model = tiny_model(vocab=V_SMALL)
    pos = torch.arange(4000)[None]
    cos32, sin32 = model.model.rotary_emb(pos, 4000)
    model.to(torch.bfloat16)
    cos16, sin16 = model.model.rotary_emb(pos, 4000)
    assert (cos16 - cos32).abs().max() < 1e-5 and (sin16 - sin32).abs().max() < 1e-5


def test_tied_head_shares_storage(tiny_model, tiny_checkpoint):
    model = tiny_model()
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    loaded = load_model(tiny_checkpoint)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        loaded.model.embed_tokens.weight[5].mul_(3.0)
    assert torch.equal(loaded.lm_head.weight[5], loaded.model.embed_tokens.weight[5])


def test_untied_head_is_its_own_matrix(tiny_model):
    model = tiny_model(vocab=V_SMALL, tie_word_embeddings=False)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    ids = torch.randint(0, V_SMALL, (1, 6))
    with torch.no_grad():
        before = model(ids)
        model.lm_head.weight[7].zero_()
        after = model(ids)
    assert torch.equal(after[..., 7], torch.zeros_like(after[..., 7]))
    assert torch.equal(after[..., :7], before[..., :7])


# ---- blocks against explicit formulas -------------------------------------------------------------------------


def test_rmsnorm_cast_order_bf16():
    torch.manual_seed(0)
    eps = 1e-5
    x = (torch.randn(64, 256) * 3).to(torch.bfloat16)
    w = (1 + torch.randn(256) * 0.3).to(torch.bfloat16)
    norm = RMSNorm(256, eps).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(w)
        y = norm(x)
    assert y.dtype == torch.bfloat16
    xd = x.double()
    normalised = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + eps)
    spec = normalised.to(torch.bfloat16) * w  # spec §3: normalise in high precision, cast, then x weight
    wrong = (normalised * w.double()).to(torch.bfloat16)  # weight applied before the cast
    assert torch.equal(y, spec)
    assert not torch.equal(spec, wrong)  # the order is observable on this input


def test_rmsnorm_fp32_formula_and_config_eps(tiny_model):
    torch.manual_seed(1)
    x = torch.randn(3, 5, 64) * 0.01  # small enough that eps matters
    model = tiny_model(vocab=V_SMALL, rms_norm_eps=0.25)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * model.config.num_hidden_layers + 1
    assert all(m.eps == 0.25 for m in norms)
    w = torch.randn(64)
    n = norms[0]
    with torch.no_grad():
        n.weight.copy_(w)
        y = n(x)
    xd = x.double()
    ref = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 0.25) * w.double()
    assert rel_err(y, ref) < 1e-6


def _rope_config(tiny_config, orig: int, max_pos: int, differ: bool = True):
    """head_dim 16 (8 factors); long = 2 x short + 1 so a wrong factor set is obvious."""
    short = [1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0]
    long = [2 * f + 1 for f in short] if differ else short
    rs = {"rope_type": "longrope", "short_factor": short, "long_factor": long,
          "original_max_position_embeddings": orig}
    return tiny_config(vocab=V_SMALL, rope_scaling=rs, max_position_embeddings=max_pos)


@pytest.mark.parametrize("orig,max_pos,total", [
    (32768, 32768, 4096),    # shipped: m = 1, short factors
    (32768, 32768, 32768),   # exactly orig: still short
    (32768, 32768, 32769),   # one past orig: long
    (4096, 131072, 100),     # max_pos > orig: m = sqrt(1 + ln 32 / ln 4096)
    (4096, 131072, 9000),
])
def test_longrope_tables_match_spec(tiny_config, orig, max_pos, total):
    cfg = _rope_config(tiny_config, orig, max_pos)
    rope = RotaryEmbedding(cfg)
    positions = torch.stack([torch.arange(total - 64, total), torch.arange(0, 64)])  # [2, 64] per-row positions
    cos, sin = rope(positions, total)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (2, 64, 16)
    rcos, rsin = spec_cos_sin(positions, cfg, total)
    # fp32 angles at position p carry ~p * 2^-24 rad of rounding
    tol = 4 * total * 2.0**-24 + 1e-6
    assert (cos.double() - rcos).abs().max() < tol
    assert (sin.double() - rsin).abs().max() < tol
    m = rcos[0, 0, 0] ** 2 + rsin[0, 0, 0] ** 2
    assert ((cos.double() ** 2 + sin.double() ** 2) - m).abs().max() < 1e-5
    if max_pos > orig:
        assert m.sqrt().item() == pytest.approx(math.sqrt(1 + math.log(max_pos / orig) / math.log(orig)))
    else:
        assert m.item() == pytest.approx(1.0)


def test_longrope_factor_set_switches_after_orig_max(tiny_config):
    cfg = _rope_config(tiny_config, orig=16, max_pos=16)
    rope = RotaryEmbedding(cfg)
    pos = torch.arange(16)[None]
    short_cos, _ = spec_cos_sin(pos, cfg, 16)
    long_cos, _ = spec_cos_sin(pos, cfg, 17)
    assert (short_cos - long_cos).abs().max() > 0.1
    assert (rope(pos, 16)[0].double() - short_cos).abs().max() < 1e-6  # total == orig: short
    assert (rope(pos, 17)[0].double() - long_cos).abs().max() < 1e-6  # total == orig + 1: long, for every position


def test_rotation_runs_in_fp32():
    torch.manual_seed(2)
    x = (torch.randn(2, 9, 3, 16) * 4).to(torch.bfloat16)
    ang = torch.rand(2, 9, 8, dtype=torch.float64) * 50
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().float(), ang.sin().float()
    y = apply_rotary(x, cos, sin)
    assert y.dtype == torch.bfloat16
    exact = spec_rotate(x.double(), cos.double(), sin.double()).to(torch.bfloat16)
    in_bf16 = spec_rotate(x, cos.to(torch.bfloat16), sin.to(torch.bfloat16))
    mismatch = (y != exact).float().mean().item()
    mismatch_bf16 = (in_bf16 != exact).float().mean().item()
    assert mismatch < 0.01  # only double-rounding ties
    assert mismatch_bf16 > 0.1  # bf16 arithmetic is observably different


# ---- whole forward against the reference -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["tied-longrope", "untied-longrope", "plain-rope-mha", "longrope-m>1-long"])
def test_forward_matches_spec_reference(tiny_model, variant):
    kw = dict(vocab=V_SMALL, layers=3)
    T = 12
    if variant == "untied-longrope":
        kw["tie_word_embeddings"] = False
    elif variant == "plain-rope-mha":
        kw.update(rope_scaling=None, kv_heads=4, rope_theta=500.0)
    elif variant == "longrope-m>1-long":
        kw.update(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8,
                                "long_factor": [1.0, 2, 3, 4, 5, 6, 7, 8], "original_max_position_embeddings": 8},
                  max_position_embeddings=64)
    model = tiny_model(seed=4, **kw)
    ids = torch.randint(0, V_SMALL, (2, T))
    with torch.no_grad():
        got = model(ids)
    ref = reference_logits(model, ids)
    assert rel_err(got, ref) < 2e-5


@pytest.mark.parametrize("field,value", [("scale_emb", 3.0), ("scale_depth", 4.0), ("dim_model_base", 64)])
def test_mup_factors_each_matter(tiny_model, tiny_config, field, value):
    base = tiny_model(seed=5, vocab=V_SMALL, layers=2)
    cfg = tiny_config(vocab=V_SMALL, layers=2, **{field: value})
    assert getattr(cfg, field) != getattr(base.config, field)
    perturbed = tiny_model(config=cfg)
    perturbed.load_state_dict(base.state_dict())
    ids = torch.randint(0, V_SMALL, (2, 10))
    with torch.no_grad():
        got = perturbed(ids)
    ref_new = reference_logits(perturbed, ids)
    ref_old = reference_logits(base, ids)
    assert rel_err(got, ref_new) < 2e-5  # follows the factor as the spec predicts
    assert rel_err(got, ref_old) > 1e-2  # and the factor is not ignored


def test_logit_divisor_scales_logits_exactly(tiny_model, tiny_config):
    # dim_model_base 256 -> 128 doubles hidden/dim_model_base: every logit halves, bit for bit
    a = tiny_model(seed=6, vocab=V_SMALL)
    b = tiny_model(config=tiny_config(vocab=V_SMALL, dim_model_base=128))
    b.load_state_dict(a.state_dict())
    assert a.config.logit_divisor == 0.25 and b.config.logit_divisor == 0.5
    ids = torch.randint(0, V_SMALL, (1, 8))
    with torch.no_grad():
        assert torch.equal(a(ids), 2 * b(ids))


# ---- batches, padding and the KV cache -------------------------------------------------------------------------


def test_kv_cache_decode_equals_full_forward(tiny_model):
    torch.manual_seed(7)
    model = tiny_model(seed=7, vocab=V_SMALL)
    lens, steps = [5, 9], 4
    seqs = [torch.randint(0, V_SMALL, (n + steps,)) for n in lens]
    with torch.no_grad():
        full = [model(s[None])[0] for s in seqs]
        cache = model.new_cache(2, 16)
        ids = torch.zeros(2, max(lens), dtype=torch.long)  # right-padded with token 0
        for b, n in enumerate(lens):
            ids[b, :n] = seqs[b][:n]
        out = model(ids, cache=cache, new_lens=lens)
        for b, n in enumerate(lens):
            assert rel_err(out[b, :n], full[b][:n]) < 1e-5
        for t in range(steps):
            tok = torch.stack([seqs[b][n + t] for b, n in enumerate(lens)])[:, None]
            out = model(tok, cache=cache)
            for b, n in enumerate(lens):
                assert rel_err(out[b, 0], full[b][n + t]) < 1e-5, (t, b)
    assert cache.lens == [n + steps for n in lens]


def test_chunked_prefill_and_last_only(tiny_model):
    model = tiny_model(seed=8, vocab=V_SMALL)
    ids = torch.randint(0, V_SMALL, (2, 11))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 11)
        a = model(ids[:, :4], cache=cache)
        b = model(ids[:, 4:], cache=cache, last_only=True)
    assert rel_err(a, full[:, :4]) < 1e-5
    assert b.shape == (2, V_SMALL)
    assert rel_err(b, full[:, -1]) < 1e-5
    with pytest.raises(RequestError):
        model(ids[:, :1], cache=cache)  # the cache is full


def test_padded_batch_equals_rows_alone(tiny_model):
    model = tiny_model(seed=9, vocab=V_SMALL)
    lens = [3, 10, 7]
    ids = torch.randint(0, V_SMALL, (3, 10))
    with torch.no_grad():
        out = model(ids, new_lens=lens)
        last = model(ids, new_lens=lens, last_only=True)
        for b, n in enumerate(lens):
            alone = model(ids[b: b + 1, :n])[0]
            assert rel_err(out[b, :n], alone) < 1e-5
            assert rel_err(last[b], alone[-1]) < 1e-5


def test_bad_inputs():
    from longcpm.config import ModelConfig
    from longcpm.models.minicpm4 import MiniCPM4ForCausalLM

    cfg = ModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=10, head_dim=8)
    model = MiniCPM4ForCausalLM(cfg)
    with pytest.raises(ValueError):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        model(torch.zeros(1, 4, dtype=torch.long), attention="flash")


def test_decode_picks_factor_set_by_total_length(tiny_config, tiny_model):
    # prompt already past orig_max: every key is long-rotated, so cached decode must keep using the long set
    # (chosen by the total length, not by the 1-token step) and match the full forward
    cfg = _rope_config(tiny_config, orig=16, max_pos=16)
    try:
        model = tiny_model(config=cfg, seed=16)
    except ConfigError:
        pytest.skip("configs with long_factor != short_factor are refused")
    ids = torch.randint(0, V_SMALL, (2, 24))
    with torch.no_grad():
        cache = model.new_cache(2, 24)
        model(ids[:, :20], cache=cache, new_lens=[18, 20])
        for t in range(4):
            out = model(torch.stack([ids[0, 18 + t], ids[1, 20 + t]])[:, None], cache=cache)
            assert rel_err(out[0, 0], model(ids[:1, : 19 + t])[0, -1]) < 1e-5, t
            assert rel_err(out[1, 0], model(ids[1:, : 21 + t])[0, -1]) < 1e-5, t


def test_cache_across_orig_max_with_different_factor_sets(tiny_config, tiny_model):
    cfg = _rope_config(tiny_config, orig=16, max_pos=16)
    try:
        model = tiny_model(config=cfg, seed=10)
    except ConfigError:
        return  # refusing such a config is an accepted answer
    ids = torch.randint(0, V_SMALL, (1, 20))
    with torch.no_grad():
        cache = model.new_cache(1, 20)
        model(ids[:, :15], cache=cache)
        for t in range(15, 20):  # step t makes the total length t + 1; 17 and up is past orig_max = 16
            try:
                got = model(ids[:, t: t + 1], cache=cache)[0, 0]
            except (ConfigError, RequestError):
                assert t == 16  # refusing the crossing step (and only it) is an accepted answer too
                return
            assert rel_err(got, model(ids[:, : t + 1])[0, t]) < 1e-5, t


# ---- InfLLM-V2: dense vs sparse ---------------------------------------------------------------------------------


def test_sparse_with_full_budget_equals_dense(tiny_model):
    sc = dict(SMALL_SPARSE, topk=8, dense_len=0)  # budget 9 blocks >= the 5 blocks of 40 tokens
    model = tiny_model(seed=11, vocab=V_SMALL, sparse_config=sc)
    ids = torch.randint(0, V_SMALL, (2, 40))
    with torch.no_grad():
        dense = model(ids, attention="dense")
        auto = model(ids)
        forced = model(ids, attention="sparse")
    assert rel_err(auto, dense) < 1e-5
    assert rel_err(forced, dense) < 1e-5


def test_forced_modes(tiny_model, tiny_config):
    model = tiny_model(seed=12, vocab=V_SMALL, sparse_config=SMALL_SPARSE)
    plain = tiny_model(config=tiny_config(vocab=V_SMALL))
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, V_SMALL, (1, 40))
    with torch.no_grad():
        # "dense" ignores the sparse_config entirely, even above dense_len
        assert torch.equal(model(ids, attention="dense"), plain(ids))
        # "sparse" at 28 tokens (< dense_len 32): queries of block 3 drop block 1
        short = ids[:, :28]
        auto, forced = model(short), model(short, attention="sparse")
    assert torch.equal(auto, plain(short))
    assert rel_err(forced[:, :24], auto[:, :24]) < 1e-5  # blocks 0-2 still see every block
    assert rel_err(forced[:, 24:], auto[:, 24:]) > 1e-3


def test_switch_happens_exactly_at_dense_len(tiny_model):
    model = tiny_model(seed=13, vocab=V_SMALL, sparse_config=SMALL_SPARSE)
    ids = torch.randint(0, V_SMALL, (1, 32))
    with torch.no_grad():
        below = ids[:, :31]
        assert torch.equal(model(below), model(below, attention="dense"))  # dense_len - 1: the dense path
        at_auto, at_dense, at_sparse = model(ids), model(ids, attention="dense"), model(ids, attention="sparse")
    assert rel_err(at_auto[:, 24:], at_dense[:, 24:]) > 1e-3  # dense_len: sparse, and block 1 is dropped
    assert rel_err(at_auto, at_sparse) < 1e-6


def test_switch_at_dense_len_during_decode(tiny_model):
    model = tiny_model(seed=14, vocab=V_SMALL, sparse_config=SMALL_SPARSE)
    ids = torch.randint(0, V_SMALL, (1, 32))

    def last_step(prompt_len, attention):
        cache = model.new_cache(1, 32)
        model(ids[:, :prompt_len], cache=cache, attention=attention)
        return model(ids[:, prompt_len: prompt_len + 1], cache=cache, attention=attention)

    with torch.no_grad():
        assert torch.equal(last_step(30, "auto"), last_step(30, "dense"))  # total 31 < dense_len
        assert rel_err(last_step(31, "auto"), last_step(31, "dense")) > 1e-3  # total 32 == dense_len


def test_sparse_cache_decode_equals_sparse_full_forward(tiny_model):
    model = tiny_model(seed=15, vocab=V_SMALL, sparse_config=SMALL_SPARSE)
    ids = torch.randint(0, V_SMALL, (2, 36))
    lens = [28, 33]
    with torch.no_grad():
        full = [model(ids[b: b + 1], attention="sparse")[0] for b in range(2)]
        cache = model.new_cache(2, 36)
        out = model(ids[:, :33], cache=cache, new_lens=lens, attention="sparse")
        for b, n in enumerate(lens):
            assert rel_err(out[b, :n], full[b][:n]) < 1e-5
        for t in range(3):
            tok = torch.stack([ids[b, n + t] for b, n in enumerate(lens)])[:, None]
            out = model(tok, cache=cache, attention="sparse")
            for b, n in enumerate(lens):
                assert rel_err(out[b, 0], full[b][n + t]) < 1e-5, (t, b)
