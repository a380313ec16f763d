"""Shared test fixtures: where ../shared lives, tiny MiniCPM4 configs derived from the real 0.5B config,
tiny random models and checkpoints written to tmp_path.

The shared folder sits beside the repository root (override with LONGCPM_SHARED). Tests that need the real
files skip when it is absent; tiny configs fall back to the same field values with synthetic rope factors.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from longcpm.config import ModelConfig

REAL_05B = Path("checkpoints") / "minicpm4-0.5b"

# The scalar fields of the shipped MiniCPM4-0.5B config.json (spec §1), used only when ../shared is absent.
_FALLBACK_05B = {
    "architectures": ["MiniCPMForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": [2, 73440],
    "hidden_act": "silu",
    "hidden_size": 1024,
    "initializer_range": 0.1,
    "intermediate_size": 4096,
    "max_position_embeddings": 32768,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "rope_type": "longrope",
        "long_factor": [1.0 + 48.9 * i / 31 for i in range(32)],
        "short_factor": [1.0 + 48.9 * i / 31 for i in range(32)],
        "original_max_position_embeddings": 32768,
    },
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 73448,
    "scale_emb": 12,
    "dim_model_base": 256,
    "scale_depth": 1.4,
}


def shared_path() -> Path:
    env = os.environ.get("LONGCPM_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"


def real_05b_dir() -> Path:
    """The real MiniCPM4-0.5B config + tokenizer: ../shared when present, else the byte-identical copy shipped in
    the package (src/longcpm/assets), so a clone without ../shared still runs every real-file test."""
    p = shared_path() / REAL_05B
    if (p / "config.json").is_file():
        return p
    from longcpm.assets import asset_dir

    return asset_dir("minicpm4-0.5b")


def real_config_file() -> Path:
    return real_05b_dir() / "config.json"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    p = shared_path()
    if not p.is_dir():
        pytest.skip(f"shared folder not found at {p} (set LONGCPM_SHARED)")
    return p


@pytest.fixture(scope="session")
def real_checkpoint_dir() -> Path:
    return real_05b_dir()


@pytest.fixture(scope="session")
def real_config_path(real_checkpoint_dir) -> Path:
    return real_checkpoint_dir / "config.json"


@pytest.fixture
def real_config_dict(real_config_path) -> dict:
    return json.loads(real_config_path.read_text())


def _base_dict() -> dict:
    f = real_config_file()
    if f.is_file():
        return json.loads(f.read_text())
    return copy.deepcopy(_FALLBACK_05B)


@pytest.fixture
def config_05b_dict() -> dict:
    """The MiniCPM4-0.5B config.json as a dict: the real file when ../shared is present, else its spec values
    with synthetic LongRoPE factors (for tests that only need its shape)."""
    return _base_dict()


def _slice_factors(factors: list, want: int) -> list:
    """Keep the spread of the real factors (first to last) at a smaller head_dim: every len/want-th value."""
    step = max(1, len(factors) // want)
    out = list(factors[::step])[:want]
    if len(out) < want:
        out += [out[-1]] * (want - len(out))
    return out


def make_tiny_config_dict(*, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                          intermediate: int = 128, vocab: int | None = None, rope_scaling="sliced",
                          sparse_config: dict | None = None, **fields) -> dict:
    """A config.json dict derived from the real MiniCPM4-0.5B one: few layers, small hidden, real vocab (unless
    `vocab` is given) and μP constants, LongRoPE factors sliced to head_dim/2. `rope_scaling`: "sliced" (default),
    None (MiniCPM-1 style plain RoPE) or a dict used verbatim. Other keyword arguments override fields."""
    d = _base_dict()
    d.update(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
             intermediate_size=intermediate)
    if vocab is not None:
        d["vocab_size"] = vocab
    head_dim = fields.get("head_dim") or hidden // heads
    if rope_scaling == "sliced":
        rs = dict(d["rope_scaling"])
        rs["short_factor"] = _slice_factors(rs["short_factor"], head_dim // 2)
        rs["long_factor"] = _slice_factors(rs["long_factor"], head_dim // 2)
        d["rope_scaling"] = rs
    elif rope_scaling is None:
        d.pop("rope_scaling", None)
    else:
        d["rope_scaling"] = rope_scaling
    if sparse_config is not None:
        d["sparse_config"] = sparse_config
    d.update(fields)
    return d


@pytest.fixture
def tiny_config_dict():
    """Factory: tiny_config_dict(**kw) -> dict (see make_tiny_config_dict)."""
    return make_tiny_config_dict


@pytest.fixture
def tiny_config():
    """Factory: tiny_config(**kw) -> ModelConfig (see make_tiny_config_dict for the keywords)."""

    def make(**kw) -> ModelConfig:
        return ModelConfig.from_dict(make_tiny_config_dict(**kw), source="tiny_config")

    return make


def build_tiny_model(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random MiniCPM4ForCausalLM in eval mode (HF-style init: normal(0, initializer_range), norms = 1)."""
    from longcpm.models.minicpm4 import MiniCPM4ForCausalLM

    model = MiniCPM4ForCausalLM(config)
    model.init_weights(seed=seed)
    if dtype != torch.float32:
        model.to(dtype)
        # nn.Module.to(dtype) also casts the fp32 rotary tables; rebuild them as the loader does
        model.model.rotary_emb.reset_buffers()
    return model.eval()


@pytest.fixture
def tiny_model(tiny_config):
    """Factory: tiny_model(config=None, seed=0, dtype=torch.float32, **tiny_config_kw) -> model."""

    def make(config: ModelConfig | None = None, seed: int = 0, dtype: torch.dtype = torch.float32, **kw):
        return build_tiny_model(config if config is not None else tiny_config(**kw), seed=seed, dtype=dtype)

    return make


@pytest.fixture
def make_checkpoint(tmp_path, tiny_model):
    """Factory: make_checkpoint(name="tiny", config=None, seed=0, max_shard_bytes=..., dtype=None, **tiny_config_kw)
    -> folder with config.json + safetensors written by longcpm.models.save_model."""
    from longcpm.models.checkpoint import save_model

    def make(name: str = "tiny", config: ModelConfig | None = None, seed: int = 0, **kw) -> Path:
        save_kw = {k: kw.pop(k) for k in ("max_shard_bytes", "dtype") if k in kw}
        model = tiny_model(config=config, seed=seed, **kw)
        return save_model(model, tmp_path / name, **save_kw)

    return make


@pytest.fixture
def tiny_checkpoint(make_checkpoint) -> Path:
    """A tiny random checkpoint folder (2 layers, hidden 64, real vocab) in tmp_path."""
    return make_checkpoint()
