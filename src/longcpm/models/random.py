"""Random-weight checkpoints with the real MiniCPM4 tokenizer, for tests, demos and speed measurements.

Named configs: "minicpm4-0.5b" (the shipped config.json), "minicpm4-8b", "minicpm4.1-8b" (spec §1 columns) and
"tiny" (2 layers, real vocabulary, untied lm_head). Knows nothing of the engine.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

from ..assets import asset_dir
from ..config import ModelConfig
from ..errors import ConfigError
from .checkpoint import build_model, parse_dtype, save_model

DEFAULT = object()  # tokenizer_dir default: the tokenizer shipped in longcpm/assets
NAMED_CONFIGS = ("minicpm4-0.5b", "minicpm4-8b", "minicpm4.1-8b", "tiny")
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "chat_template.jinja")
# spec §8: the sparse_config published in the MiniCPM4.1 README
_SPARSE_41 = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64, "window_size": 2048,
              "topk": 64, "use_nope": False, "dense_len": 8192}


def resample_factors(factors: list[float], n: int) -> list[float]:
    """Linear interpolation of a LongRoPE factor curve to n points (same endpoints, same shape)."""
    if len(factors) == n:
        return list(factors)
    if n == 1 or len(factors) == 1:
        return [float(factors[0])] * n
    out = []
    for i in range(n):
        x = i * (len(factors) - 1) / (n - 1)
        lo = min(int(x), len(factors) - 2)
        out.append(factors[lo] + (factors[lo + 1] - factors[lo]) * (x - lo))
    return out


def _base_dict() -> dict:
    return json.loads((asset_dir("minicpm4-0.5b") / "config.json").read_text())


def named_config_dict(name: str) -> dict:
    """config.json contents of a named config."""
    d = _base_dict()
    if name == "minicpm4-0.5b":
        return d
    if name == "tiny":
        # untied: with a random tied head the argmax is mostly the input token, which makes generation tests vacuous
        d.update(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, tie_word_embeddings=False)
        return _fit_rope(d)
    if name in ("minicpm4-8b", "minicpm4.1-8b"):
        max_pos = 32768 if name == "minicpm4-8b" else 65536
        # Placeholder factors for random checkpoints only: no cited source gives the shipped 64-value vectors,
        # so the 0.5B curve is resampled to 64 points. Real checkpoints always carry their own factors.
        factors = resample_factors(d["rope_scaling"]["long_factor"], 64)
        d.update(model_type="minicpm", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=2, intermediate_size=16384, rms_norm_eps=1e-6, max_position_embeddings=max_pos,
                 tie_word_embeddings=False, mup_denominator=32, rope_theta=10000.0)
        d["rope_scaling"] = {"rope_type": "longrope", "long_factor": factors, "short_factor": list(factors),
                             "original_max_position_embeddings": max_pos}
        d["_name_or_path"] = {"minicpm4-8b": "openbmb/MiniCPM4-8B", "minicpm4.1-8b": "openbmb/MiniCPM4.1-8B"}[name]
        if name == "minicpm4.1-8b":
            d["sparse_config"] = dict(_SPARSE_41)
        return d
    raise ConfigError(f"unknown config name {name!r} (named configs: {', '.join(NAMED_CONFIGS)}; "
                      f"or give a path to a config.json or a model folder)")


def _fit_rope(d: dict) -> dict:
    """After a size override, resample LongRoPE factors to head_dim/2 so the config stays consistent."""
    rs = d.get("rope_scaling")
    heads = d.get("num_attention_heads") or 1
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    if isinstance(rs, dict) and rs.get("rope_type", rs.get("type")) == "longrope":
        for key in ("long_factor", "short_factor"):
            if isinstance(rs.get(key), list) and rs[key] and len(rs[key]) != head_dim // 2:
                rs[key] = resample_factors(rs[key], max(head_dim // 2, 1))
    return d


def _source_dict(config) -> dict:
    if isinstance(config, ModelConfig):
        return config.to_dict()
    if isinstance(config, str) and config in NAMED_CONFIGS:
        return named_config_dict(config)
    path = Path(config).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        return named_config_dict(str(config))  # raises the "unknown config name" error
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def resolve_config(config, overrides: dict | None = None) -> ModelConfig:
    """A named config, a config.json path / model folder, or a ModelConfig, with config.json-key overrides."""
    d = _source_dict(config)
    d.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return ModelConfig.from_dict(_fit_rope(d), source=f"config {config!r}" if isinstance(config, str) else "config")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build parameters directly in the saved dtype, so an 8B bf16 checkpoint does not need fp32 memory."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def create_random_checkpoint(out_dir, config="tiny", *, seed: int = 0, dtype: str = "bfloat16",
                             tokenizer_dir=DEFAULT, overrides: dict | None = None) -> Path:
    """Write config.json, generation_config.json, model.safetensors (random weights) and tokenizer files."""
    cfg = resolve_config(config, overrides)
    dt = parse_dtype(dtype)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    with default_dtype(dt):
        model = build_model(cfg, "cpu")
    model.init_weights(seed)
    save_model(model, out, dtype=dt)
    src = asset_dir("minicpm4-0.5b") if tokenizer_dir is DEFAULT else Path(tokenizer_dir)
    copied = [f for f in _TOKENIZER_FILES if (src / f).is_file()]
    if not any(f in copied for f in ("tokenizer.model", "tokenizer.json")):
        raise FileNotFoundError(f"{src}: no tokenizer.model or tokenizer.json to copy")
    for f in copied:
        shutil.copyfile(src / f, out / f)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids),
           "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else 2,
           "do_sample": True, "temperature": 0.8, "top_p": 0.8}
    if (src / "generation_config.json").is_file():
        gen = json.loads((src / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out
