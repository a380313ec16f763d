"""μP parameter groups and init scaling."""

import math

import pytest
import torch

from longcpm.models.random import resolve_config
from longcpm.train.mup import hidden_init_std, hidden_lr_scale, mup_init_, mup_param_groups, param_group_of


def _model(**overrides):
    from longcpm.models.checkpoint import build_model
    cfg = resolve_config("tiny", {"hidden_size": 128, "intermediate_size": 256, "vocab_size": 512, **overrides})
    return build_model(cfg, "cpu")


def test_groups_split_and_scale():
    m = _model()
    groups = {g["name"]: g for g in mup_param_groups(m, lr=0.01, weight_decay=0.1)}
    assert hidden_lr_scale(m.config) == pytest.approx(256 / 128)  # dim_model_base / hidden
    assert groups["hidden"]["lr"] == pytest.approx(0.01 * 2.0) and groups["hidden"]["weight_decay"] == 0.1
    for name in ("embed", "vector"):
        assert groups[name]["lr"] == 0.01 and groups[name]["weight_decay"] == 0.0
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    named = dict(m.named_parameters())
    assert ids["embed"] == {id(named["model.embed_tokens.weight"]), id(named["lm_head.weight"])}
    assert id(named["model.layers.0.self_attn.q_proj.weight"]) in ids["hidden"]
    assert id(named["model.layers.1.mlp.down_proj.weight"]) in ids["hidden"]
    assert id(named["model.norm.weight"]) in ids["vector"]
    assert id(named["model.layers.0.input_layernorm.weight"]) in ids["vector"]
    assert sum(len(v) for v in ids.values()) == len(named)


def test_switch_off_and_tied():
    m = _model(tie_word_embeddings=True, hidden_size=1024, intermediate_size=64)
    groups = {g["name"]: g for g in mup_param_groups(m, lr=0.01, weight_decay=0.0, mup=False)}
    assert groups["hidden"]["lr"] == 0.01
    assert len(groups["embed"]["params"]) == 1  # tied lm_head is the embedding
    on = {g["name"]: g for g in mup_param_groups(m, lr=0.01, weight_decay=0.0)}
    assert on["hidden"]["lr"] == pytest.approx(0.01 * 256 / 1024)  # spec table: 0.5B hidden-matrix lr 2.5e-3
    assert param_group_of("model.layers.0.self_attn.q_proj.bias", torch.zeros(3)) == "vector"


def test_init_scaling():
    m = _model(hidden_size=1024, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2)
    mup_init_(m, seed=0, scale_hidden=True)
    assert hidden_init_std(m.config) == pytest.approx(0.1 / math.sqrt(4))
    q = m.model.layers[0].self_attn.q_proj.weight
    assert q.std().item() == pytest.approx(0.05, rel=0.02)
    assert m.model.embed_tokens.weight.std().item() == pytest.approx(0.1, rel=0.02)
    assert torch.all(m.model.norm.weight == 1)
    # without scaling it is the HF init of the model itself, draw for draw
    ref = _model(hidden_size=1024, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2)
    ref.init_weights(seed=5)
    mup_init_(m, seed=5, scale_hidden=False)
    for (n, a), (_, b) in zip(m.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n
