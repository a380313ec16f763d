"""config.json parsing: the real MiniCPM4-0.5B file, synthetic MiniCPM4-8B / 4.1-8B / MiniCPM-2B configs, and the
errors a broken file must produce (naming both the field and the file)."""

from __future__ import annotations

import json
import math

import pytest

from longcpm.config import ModelConfig, SparseConfig, load_config
from longcpm.errors import ConfigError, LongcpmError

# spec §1 / §8
README_SPARSE = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64, "window_size": 2048,
                 "topk": 64, "use_nope": False, "dense_len": 8192}


def _factors(n: int, last: float) -> list[float]:
    return [1.0 + (last - 1.0) * i / (n - 1) for i in range(n)]


def minicpm4_8b_dict(**over) -> dict:
    d = {
        "architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm",
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 2,
        "intermediate_size": 16384, "hidden_act": "silu", "vocab_size": 73448, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768, "rope_theta": 10000.0,
        "rope_scaling": {"rope_type": "longrope", "original_max_position_embeddings": 32768,
                         "long_factor": _factors(64, 31.0), "short_factor": _factors(64, 31.0)},
        "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256, "tie_word_embeddings": False,
        "mup_denominator": 32, "initializer_range": 0.1, "bos_token_id": 1, "eos_token_id": [2, 73440],
        "torch_dtype": "bfloat16", "use_cache": True,
    }
    d.update(over)
    return d


def minicpm41_8b_dict() -> dict:
    d = minicpm4_8b_dict(max_position_embeddings=65536, sparse_config=dict(README_SPARSE))
    d["rope_scaling"]["original_max_position_embeddings"] = 65536
    return d


def minicpm_2b_dict() -> dict:
    """MiniCPM-2B (v1/v2 style): MHA (no num_key_value_heads), plain RoPE, no rope_scaling."""
    return {
        "architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "hidden_size": 2304,
        "num_hidden_layers": 40, "num_attention_heads": 36, "intermediate_size": 5760, "vocab_size": 122753,
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "scale_emb": 12, "dim_model_base": 256, "scale_depth": 1.4, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "bfloat16", "initializer_range": 0.1,
    }


def write(tmp_path, d, name="config.json"):
    p = tmp_path / name
    p.write_text(json.dumps(d) if not isinstance(d, str) else d)
    return p


# ---- the real 0.5B config ----------------------------------------------------------------------------------


def test_real_05b_config_all_fields(real_config_path, real_config_dict):
    c = ModelConfig.from_file(real_config_path)
    assert c.hidden_size == 1024
    assert c.intermediate_size == 4096
    assert c.num_hidden_layers == 24
    assert c.num_attention_heads == 16
    assert c.num_key_value_heads == 2
    assert c.num_kv_groups == 8
    assert c.head_dim == 64  # derived: no head_dim key in the file
    assert "head_dim" not in real_config_dict
    assert c.vocab_size == 73448
    assert c.rms_norm_eps == 1e-5
    assert c.rope_theta == 10000.0  # absent -> class default
    assert c.max_position_embeddings == 32768
    assert c.tie_word_embeddings is True  # absent -> default True
    assert c.bos_token_id == 1
    assert c.eos_token_ids == (2, 73440)
    assert c.torch_dtype == "bfloat16"
    assert c.initializer_range == 0.1
    assert c.sparse_config is None
    assert c.model_type == "minicpm"  # no model_type key: from architectures
    assert "model_type" not in real_config_dict

    rs = c.rope_scaling
    assert rs.rope_type == "longrope"
    assert rs.original_max_position_embeddings == 32768
    assert len(rs.short_factor) == len(rs.long_factor) == 32
    assert list(rs.short_factor) == real_config_dict["rope_scaling"]["short_factor"]
    assert list(rs.long_factor) == real_config_dict["rope_scaling"]["long_factor"]
    assert rs.short_factor[0] == 1.0004360675811768 and rs.short_factor[-1] == 49.85338592529297

    assert c.scale_emb == 12 and c.scale_depth == 1.4 and c.dim_model_base == 256
    assert abs(c.residual_scale - 0.285774) < 1e-6
    assert c.residual_scale == pytest.approx(1.4 / math.sqrt(24), rel=1e-12)
    assert c.logit_divisor == 4
    assert c.num_parameters() == 433_873_920
    assert c.kv_bytes_per_token(2) == 12 * 1024  # spec §5: 12 KiB/token bf16
    assert c.kv_bytes_per_token(2) * 32768 == 384 * 2**20


def test_load_config_accepts_folder(real_checkpoint_dir, real_config_path):
    assert load_config(real_checkpoint_dir) == ModelConfig.from_file(real_config_path)


# ---- synthetic configs of the other family members ----------------------------------------------------------


def test_minicpm4_8b(tmp_path):
    c = ModelConfig.from_file(write(tmp_path, minicpm4_8b_dict()))
    assert c.head_dim == 128 and c.num_kv_groups == 16
    assert c.tie_word_embeddings is False
    assert c.rms_norm_eps == 1e-6
    assert len(c.rope_scaling.long_factor) == 64
    assert c.num_parameters() == 8_185_253_888
    assert c.kv_bytes_per_token(2) == 32 * 1024  # spec §5
    assert c.kv_bytes_per_token(2) * 131072 == 4 * 2**30
    assert c.residual_scale == pytest.approx(0.247487, abs=1e-6)
    assert c.logit_divisor == 16
    assert c.extra.get("mup_denominator") == 32  # kept verbatim for the EAGLE head
    # tying is the only difference between these two counts: one vocab x hidden matrix
    tied = ModelConfig.from_dict(minicpm4_8b_dict(tie_word_embeddings=True))
    assert c.num_parameters() - tied.num_parameters() == 73448 * 4096


def test_minicpm41_8b_sparse_config(tmp_path):
    c = ModelConfig.from_file(write(tmp_path, minicpm41_8b_dict()))
    assert c.max_position_embeddings == 65536
    assert c.rope_scaling.original_max_position_embeddings == 65536
    sc = c.sparse_config
    assert isinstance(sc, SparseConfig)
    for k, v in README_SPARSE.items():
        assert getattr(sc, k) == v, k
    assert sc.local_blocks == 32
    assert sc.variant == "v2"
    assert sc.budget == 64 + 32  # v2: top-k plus the forced window
    assert not sc.is_sparse(8191) and sc.is_sparse(8192)


def test_minicpm_2b_style(tmp_path):
    c = ModelConfig.from_file(write(tmp_path, minicpm_2b_dict()))
    assert c.num_key_value_heads == 36  # absent -> num_attention_heads (MHA)
    assert c.num_kv_groups == 1
    assert c.head_dim == 64
    assert c.rope_scaling.rope_type == "default"
    assert c.rope_scaling.short_factor is None
    assert c.vocab_size == 122753
    assert (c.scale_emb, c.dim_model_base, c.scale_depth) == (12, 256, 1.4)
    assert c.residual_scale == pytest.approx(1.4 / math.sqrt(40))
    assert c.logit_divisor == 2304 / 256
    assert c.eos_token_ids == (2,)
    h, i, L, V = 2304, 5760, 40, 122753
    non_embedding = L * (4 * h * h + 3 * h * i + 2 * h) + h
    assert non_embedding == 2_442_057_984  # the published "2.4B non-embedding"
    assert c.num_parameters() == V * h + non_embedding  # tied by default


def test_head_dim_key_wins_when_present(tmp_path):
    # SALA-style configs carry an explicit head_dim that need not be hidden/heads
    d = minicpm4_8b_dict(head_dim=64)
    d["rope_scaling"]["short_factor"] = d["rope_scaling"]["short_factor"][:32]
    d["rope_scaling"]["long_factor"] = d["rope_scaling"]["long_factor"][:32]
    c = ModelConfig.from_file(write(tmp_path, d))
    assert c.head_dim == 64


def test_missing_mup_fields_use_hf_class_defaults(tmp_path):
    d = minicpm_2b_dict()
    for k in ("scale_emb", "scale_depth", "dim_model_base"):
        d.pop(k)
    c = ModelConfig.from_file(write(tmp_path, d))
    # configuration_minicpm.MiniCPMConfig: scale_emb=1, dim_model_base=1, scale_depth=1
    assert c.scale_emb == 1 and c.scale_depth == 1
    assert c.residual_scale == pytest.approx(1 / math.sqrt(40))
    assert c.logit_divisor == 2304 / 1


# ---- errors: field and file named -----------------------------------------------------------------------------


def _err(tmp_path, d) -> str:
    p = write(tmp_path, d)
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_file(p)
    msg = str(ei.value)
    assert str(p) in msg, f"file not named: {msg}"
    assert isinstance(ei.value, LongcpmError) and isinstance(ei.value, ValueError)
    return msg


def test_error_missing_hidden_size(tmp_path, config_05b_dict):
    d = dict(config_05b_dict)
    d.pop("hidden_size")
    msg = _err(tmp_path, d)
    assert "hidden_size" in msg and "missing" in msg


def test_error_heads_do_not_divide_hidden(tmp_path, config_05b_dict):
    d = dict(config_05b_dict, hidden_size=1000)
    msg = _err(tmp_path, d)
    assert "num_attention_heads" in msg and "hidden_size" in msg


def test_error_kv_heads_do_not_divide_heads(tmp_path, config_05b_dict):
    msg = _err(tmp_path, dict(config_05b_dict, num_key_value_heads=3))
    assert "num_key_value_heads" in msg and "16" in msg


@pytest.mark.parametrize("which", ["short_factor", "long_factor"])
def test_error_factor_count(tmp_path, config_05b_dict, which):
    d = json.loads(json.dumps(config_05b_dict))
    d["rope_scaling"][which] = d["rope_scaling"][which][:31]
    msg = _err(tmp_path, d)
    assert which in msg and "32" in msg and "31" in msg


def test_error_factor_count_follows_head_dim(tmp_path):
    # 8B head_dim 128 needs 64 factors: the 0.5B's 32 are refused
    d = minicpm4_8b_dict()
    d["rope_scaling"]["long_factor"] = d["rope_scaling"]["long_factor"][:32]
    msg = _err(tmp_path, d)
    assert "long_factor" in msg and "64" in msg


def test_error_unknown_rope_type(tmp_path, config_05b_dict):
    d = json.loads(json.dumps(config_05b_dict))
    d["rope_scaling"]["rope_type"] = "longrope2"
    msg = _err(tmp_path, d)
    assert "rope_type" in msg and "longrope2" in msg


@pytest.mark.parametrize("mt", ["llama", "minicpm3", "minicpmv"])
def test_error_unknown_model_type(tmp_path, config_05b_dict, mt):
    msg = _err(tmp_path, dict(config_05b_dict, model_type=mt))
    assert "model_type" in msg and mt in msg


def test_error_no_model_type_and_foreign_architecture(tmp_path, config_05b_dict):
    msg = _err(tmp_path, dict(config_05b_dict, architectures=["LlamaForCausalLM"]))
    assert "model_type" in msg


def test_error_invalid_json(tmp_path):
    msg = _err(tmp_path, '{"hidden_size": 1024,, }')
    assert "JSON" in msg


def test_error_top_level_not_object(tmp_path):
    _err(tmp_path, "[1, 2, 3]")


def test_error_nonexistent_file(tmp_path):
    p = tmp_path / "nope" / "config.json"
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_file(p)
    assert str(p) in str(ei.value)
    # a folder without config.json names the config.json it looked for
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path)
    assert str(tmp_path / "config.json") in str(ei.value)


@pytest.mark.parametrize("field,value", [("hidden_size", "1024"), ("hidden_size", 1024.0), ("num_hidden_layers", 0),
                                         ("vocab_size", True), ("intermediate_size", None)])
def test_error_bad_integer_fields(tmp_path, config_05b_dict, field, value):
    msg = _err(tmp_path, dict(config_05b_dict, **{field: value}))
    assert field in msg


@pytest.mark.parametrize("field,value", [("tie_word_embeddings", "yes"), ("hidden_act", "gelu"),
                                         ("torch_dtype", "float8"), ("dim_model_base", -1)])
def test_error_bad_other_fields(tmp_path, config_05b_dict, field, value):
    msg = _err(tmp_path, dict(config_05b_dict, **{field: value}))
    assert field in msg


@pytest.mark.parametrize("over,field", [
    ({"window_size": 2000}, "window_size"),           # not a multiple of block_size
    ({"variant": "v3"}, "variant"),
    ({"block_size": 40}, "block_size"),               # not a multiple of kernel_stride
    ({"kernel_size": 8}, "kernel_size"),              # smaller than kernel_stride
    ({"topk": 1}, "topk"),                            # v2: must exceed init_blocks
    ({"topk": "64"}, "topk"),
    ({"dense_len": -5}, "dense_len"),
    ({"use_nope": "no"}, "use_nope"),
])
def test_error_bad_sparse_config(tmp_path, over, field):
    d = minicpm41_8b_dict()
    d["sparse_config"] = dict(README_SPARSE, **over)
    msg = _err(tmp_path, d)
    assert field in msg and "sparse_config" in msg


def test_error_sparse_config_not_an_object(tmp_path):
    d = minicpm41_8b_dict()
    d["sparse_config"] = [1, 2]
    msg = _err(tmp_path, d)
    assert "sparse_config" in msg


def test_sparse_config_dataclass_validates_on_construction():
    with pytest.raises(ConfigError, match="window_size"):
        SparseConfig(window_size=100)
    assert SparseConfig.from_dict(None) is None
    sc = SparseConfig.from_dict(dict(README_SPARSE, some_cpmcu_extra=3))  # unknown extras are ignored
    assert sc == SparseConfig.from_dict(README_SPARSE)


# ---- round trips --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("maker", ["real", "8b", "4.1-8b", "2b"])
def test_to_dict_from_dict_round_trip(tmp_path, maker, request):
    if maker == "real":
        d = request.getfixturevalue("real_config_dict")
    else:
        d = {"8b": minicpm4_8b_dict, "4.1-8b": minicpm41_8b_dict, "2b": minicpm_2b_dict}[maker]()
    c = ModelConfig.from_dict(d)
    out = c.to_dict()
    json.dumps(out)  # JSON-serialisable
    c2 = ModelConfig.from_dict(out)
    assert c2 == c
    assert c2.to_dict() == out
    # unknown keys survive (e.g. auto_map, use_cache) so save() writes back what it read
    assert set(d) <= set(out), set(d) - set(out)
    # through a file too
    c.save(tmp_path)
    assert ModelConfig.from_file(tmp_path / "config.json") == c


def test_round_trip_keeps_sparse_variant(tmp_path):
    d = minicpm41_8b_dict()
    d["sparse_config"] = dict(README_SPARSE, variant="v1", use_compress_lse=True)
    c = ModelConfig.from_dict(d)
    c2 = ModelConfig.from_dict(c.to_dict())
    assert c2.sparse_config == c.sparse_config and c2.sparse_config.variant == "v1"
    assert ModelConfig.from_dict(c.with_sparse(None).to_dict()).sparse_config is None
