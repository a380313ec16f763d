"""Typed configs parsed from Hugging Face config.json files: ModelConfig, RopeScaling, SparseConfig.

Every check names the offending field and the file, so a bad checkpoint fails with one readable line.
Knows nothing of torch modules, kernels or the engine.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError

SUPPORTED_MODEL_TYPES = ("minicpm", "minicpm4")
SUPPORTED_ARCHITECTURES = ("MiniCPMForCausalLM", "MiniCPM4ForCausalLM")
ROPE_TYPES = ("default", "longrope", "linear", "dynamic")
DTYPES = ("float32", "bfloat16", "float16")
VARIANTS = ("v1", "v2")


def _fail(source: str, name: str, msg: str) -> ConfigError:
    return ConfigError(f"{source}: field '{name}': {msg}")


@dataclass(frozen=True)
class SparseConfig:
    """InfLLM-V2 parameters (../shared/spec/infllmv2.md §1). Block sizes are in tokens.

    variant "v2" (MiniCPM4.1 / SALA): the local window is forced into the top-k budget (topk + window/block).
    variant "v1" (MiniCPM4 June 2025 / CPM.cu): top-k excludes the window, which stage 2 attends on top.
    """

    kernel_size: int = 32
    kernel_stride: int = 16
    block_size: int = 64
    init_blocks: int = 1
    window_size: int = 2048
    topk: int = 64
    dense_len: int = 8192
    use_nope: bool = False
    variant: str = "v2"
    # c2: the coarse keys whose log-sum-exp normalises stage-1 scores. Fixed to 128/64 upstream.
    lse_kernel_size: int = 128
    lse_kernel_stride: int = 64
    # v1 only: normalise stage-1 scores with the c2 LSE instead of the exact c1 LSE (CPM.cu option).
    use_compress_lse: bool = False

    def __post_init__(self):
        self.validate("sparse_config")

    @property
    def local_blocks(self) -> int:
        return self.window_size // self.block_size

    @property
    def budget(self) -> int:
        """Maximum number of selected blocks per (kv head, query token), window included for v2."""
        if self.variant == "v2":
            return self.topk + self.local_blocks
        return self.topk

    def uses_c2(self) -> bool:
        return self.variant == "v2" or self.use_compress_lse

    def is_sparse(self, total_len: int) -> bool:
        """Dense strictly below dense_len (total KV length, cache included); -1 means always sparse."""
        return self.dense_len < 0 or total_len >= self.dense_len

    def validate(self, source: str = "sparse_config") -> None:
        ints = ("kernel_size", "kernel_stride", "block_size", "init_blocks", "window_size", "topk", "dense_len",
                "lse_kernel_size", "lse_kernel_stride")
        for name in ints:
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                raise _fail(source, name, f"must be an integer, got {val!r}")
        for name in ("kernel_size", "kernel_stride", "block_size", "lse_kernel_size", "lse_kernel_stride"):
            if getattr(self, name) <= 0:
                raise _fail(source, name, f"must be positive, got {getattr(self, name)}")
        for name in ("init_blocks", "window_size", "topk"):
            if getattr(self, name) < 0:
                raise _fail(source, name, f"must be >= 0, got {getattr(self, name)}")
        if self.dense_len < -1:
            raise _fail(source, "dense_len", f"must be -1 (always sparse) or >= 0, got {self.dense_len}")
        if self.variant not in VARIANTS:
            raise _fail(source, "variant", f"must be one of {VARIANTS}, got {self.variant!r}")
        if self.kernel_size < self.kernel_stride:
            raise _fail(source, "kernel_size", f"({self.kernel_size}) must be >= kernel_stride ({self.kernel_stride})")
        if self.block_size % self.kernel_stride:
            raise _fail(source, "block_size", f"({self.block_size}) must be a multiple of kernel_stride ({self.kernel_stride})")
        if self.window_size % self.block_size:
            raise _fail(source, "window_size", f"({self.window_size}) must be a multiple of block_size ({self.block_size})")
        if self.lse_kernel_size < self.lse_kernel_stride:
            raise _fail(source, "lse_kernel_size", "must be >= lse_kernel_stride")
        # forced blocks must fit in the budget, or ties among them would make the selection ambiguous
        if self.variant == "v2" and self.topk <= self.init_blocks:
            raise _fail(source, "topk", f"({self.topk}) must exceed init_blocks ({self.init_blocks}) for variant v2")
        if self.variant == "v1" and self.topk < max(1, self.init_blocks):
            raise _fail(source, "topk", f"({self.topk}) must be >= max(1, init_blocks) for variant v1")
        for name in ("use_nope", "use_compress_lse"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(source, name, f"must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: dict | SparseConfig | None, source: str = "sparse_config", **overrides) -> SparseConfig | None:
        if d is None:
            return None
        if isinstance(d, SparseConfig):
            return replace(d, **overrides) if overrides else d
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: field 'sparse_config': must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        # Upstream configs carry CPM.cu / SALA extras that do not change the math; ignore them quietly.
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        try:
            cfg = cls.__new__(cls)
            for f in fields(cls):
                object.__setattr__(cfg, f.name, kwargs.get(f.name, f.default))
        except TypeError as e:  # pragma: no cover - defensive
            raise ConfigError(f"{source}: sparse_config: {e}") from e
        cfg.validate(f"{source}: sparse_config")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    original_max_position_embeddings: int | None = None
    factor: float | None = None  # linear / dynamic

    def to_dict(self) -> dict | None:
        if self.rope_type == "default":
            return None
        d: dict[str, Any] = {"rope_type": self.rope_type}
        if self.rope_type == "longrope":
            d["long_factor"] = list(self.long_factor)
            d["short_factor"] = list(self.short_factor)
            d["original_max_position_embeddings"] = self.original_max_position_embeddings
        else:
            d["factor"] = self.factor
        return d


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    model_type: str = "minicpm"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048
    scale_emb: float = 1.0
    scale_depth: float = 1.0
    dim_model_base: float = 1
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    initializer_range: float = 0.1
    hidden_act: str = "silu"
    sparse_config: SparseConfig | None = None
    # unknown keys kept verbatim so save() writes back what it read
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def residual_scale(self) -> float:
        """μP: every residual branch is multiplied by scale_depth / sqrt(num_layers)."""
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_divisor(self) -> float:
        """μP: the final hidden state is divided by hidden_size / dim_model_base before lm_head."""
        return self.hidden_size / self.dim_model_base

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Dense K+V cache bytes per token, all layers."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    def compressed_kv_bytes_per_token(self, dtype_bytes: int = 2) -> float:
        """Extra bytes per token for InfLLM-V2's c1/c2 compressed keys (0 when dense)."""
        sc = self.sparse_config
        if sc is None:
            return 0.0
        per = 1 / sc.kernel_stride + (1 / sc.lse_kernel_stride if sc.uses_c2() else 0)
        return self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes * per

    def num_parameters(self) -> int:
        h, i, L, V = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        per_layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else V * h
        return V * h + L * per_layer + h + head

    def with_sparse(self, sparse: SparseConfig | None) -> ModelConfig:
        return replace(self, sparse_config=sparse)

    def to_dict(self) -> dict:
        d = dict(self.extra)
        d.update({
            "architectures": d.get("architectures", ["MiniCPMForCausalLM"]),
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_dict(),
            "max_position_embeddings": self.max_position_embeddings,
            "scale_emb": self.scale_emb,
            "scale_depth": self.scale_depth,
            "dim_model_base": self.dim_model_base,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.torch_dtype,
            "initializer_range": self.initializer_range,
            "hidden_act": self.hidden_act,
        })
        if "head_dim" in self.extra or self.head_dim * self.num_attention_heads != self.hidden_size:
            d["head_dim"] = self.head_dim
        if self.sparse_config is not None:
            d["sparse_config"] = self.sparse_config.to_dict()
        else:
            d.pop("sparse_config", None)
        return d

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    # ---- parsing -----------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object at the top level")
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type is None:
            # the shipped MiniCPM4-0.5B config has no model_type, only architectures + auto_map
            if any(a in SUPPORTED_ARCHITECTURES for a in archs):
                model_type = "minicpm"
            else:
                raise _fail(source, "model_type", f"missing, and architectures {archs!r} name no supported model "
                                                  f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise _fail(source, "model_type", f"unknown model type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")

        def req_int(name: str, minimum: int = 1) -> int:
            if name not in d or d[name] is None:
                raise _fail(source, name, "missing")
            val = d[name]
            if isinstance(val, bool) or not isinstance(val, int):
                raise _fail(source, name, f"must be an integer, got {val!r}")
            if val < minimum:
                raise _fail(source, name, f"must be >= {minimum}, got {val}")
            return val

        def opt_num(name: str, default: float) -> float:
            val = d.get(name)
            if val is None:
                return default
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise _fail(source, name, f"must be a number, got {val!r}")
            return val

        hidden = req_int("hidden_size")
        heads = req_int("num_attention_heads")
        layers = req_int("num_hidden_layers")
        vocab = req_int("vocab_size")
        inter = req_int("intermediate_size")
        kv_heads = d.get("num_key_value_heads")
        if kv_heads is None:
            kv_heads = heads
        elif isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1:
            raise _fail(source, "num_key_value_heads", f"must be a positive integer, got {kv_heads!r}")
        if heads % kv_heads:
            raise _fail(source, "num_key_value_heads", f"({kv_heads}) must divide num_attention_heads ({heads})")
        if d.get("head_dim") is not None:
            head_dim = req_int("head_dim")
        else:
            if hidden % heads:
                raise _fail(source, "num_attention_heads", f"({heads}) must divide hidden_size ({hidden})")
            head_dim = hidden // heads
        if head_dim % 2:
            raise _fail(source, "head_dim", f"must be even for rotary embeddings, got {head_dim}")

        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise _fail(source, "hidden_act", f"only 'silu' is supported, got {act!r}")
        dtype = d.get("torch_dtype") or d.get("dtype") or "bfloat16"
        if dtype not in DTYPES:
            raise _fail(source, "torch_dtype", f"must be one of {DTYPES}, got {dtype!r}")

        # absent fields take the HF MiniCPMConfig class defaults (max_position_embeddings 2048, dim_model_base 1)
        max_pos = req_int("max_position_embeddings") if "max_position_embeddings" in d else 2048
        rope = _parse_rope(d.get("rope_scaling"), head_dim, max_pos, source)

        eos = d.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos_ids):
            raise _fail(source, "eos_token_id", f"must be an integer or a list of integers, got {eos!r}")

        dim_model_base = d.get("dim_model_base", 1)
        if dim_model_base is None:
            dim_model_base = 1
        if isinstance(dim_model_base, bool) or not isinstance(dim_model_base, (int, float)) or dim_model_base <= 0:
            raise _fail(source, "dim_model_base", f"must be a positive number, got {dim_model_base!r}")

        tie = d.get("tie_word_embeddings", True)
        if not isinstance(tie, bool):
            raise _fail(source, "tie_word_embeddings", f"must be true or false, got {tie!r}")

        sparse = SparseConfig.from_dict(d.get("sparse_config"), source=source)
        known = {"model_type", "hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                 "intermediate_size", "num_key_value_heads", "head_dim", "hidden_act", "torch_dtype", "dtype",
                 "max_position_embeddings", "rope_scaling", "rope_theta", "eos_token_id", "bos_token_id",
                 "pad_token_id", "dim_model_base", "scale_emb", "scale_depth", "tie_word_embeddings",
                 "rms_norm_eps", "initializer_range", "attention_bias", "sparse_config"}
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(
            hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv_heads, vocab_size=vocab, head_dim=head_dim, model_type=model_type,
            rms_norm_eps=opt_num("rms_norm_eps", 1e-6), rope_theta=opt_num("rope_theta", 10000.0),
            rope_scaling=rope, max_position_embeddings=max_pos,
            scale_emb=opt_num("scale_emb", 1.0), scale_depth=opt_num("scale_depth", 1.0),
            dim_model_base=dim_model_base, tie_word_embeddings=tie,
            attention_bias=bool(d.get("attention_bias", False)),
            bos_token_id=d.get("bos_token_id", 1), eos_token_ids=eos_ids, pad_token_id=d.get("pad_token_id"),
            torch_dtype=dtype, initializer_range=opt_num("initializer_range", 0.1), hidden_act="silu",
            sparse_config=sparse, extra=extra,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: no such file (a model folder needs config.json)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(d, source=str(path))


def _parse_rope(rs: Any, head_dim: int, max_pos: int, source: str) -> RopeScaling:
    if rs is None:
        return RopeScaling()
    if not isinstance(rs, dict):
        raise _fail(source, "rope_scaling", f"must be an object or null, got {rs!r}")
    rtype = rs.get("rope_type", rs.get("type"))
    if rtype not in ROPE_TYPES:
        raise _fail(source, "rope_scaling.rope_type", f"unknown rope type {rtype!r} (supported: {', '.join(ROPE_TYPES)})")
    if rtype == "default":
        return RopeScaling()
    if rtype in ("linear", "dynamic"):
        factor = rs.get("factor")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
            raise _fail(source, "rope_scaling.factor", f"must be a positive number, got {factor!r}")
        return RopeScaling(rope_type=rtype, factor=float(factor))
    want = head_dim // 2
    factors = {}
    for name in ("short_factor", "long_factor"):
        f = rs.get(name)
        if not isinstance(f, (list, tuple)) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in f):
            raise _fail(source, f"rope_scaling.{name}", "must be a list of numbers")
        if len(f) != want:
            raise _fail(source, f"rope_scaling.{name}", f"has {len(f)} factors, expected head_dim/2 = {want}")
        if any(x <= 0 for x in f):
            raise _fail(source, f"rope_scaling.{name}", "factors must be positive")
        factors[name] = tuple(float(x) for x in f)
    orig = rs.get("original_max_position_embeddings", max_pos)
    if not isinstance(orig, int) or isinstance(orig, bool) or orig <= 0:
        raise _fail(source, "rope_scaling.original_max_position_embeddings", f"must be a positive integer, got {orig!r}")
    return RopeScaling(rope_type="longrope", short_factor=factors["short_factor"], long_factor=factors["long_factor"],
                       original_max_position_embeddings=orig)


def load_config(path: str | Path) -> ModelConfig:
    return ModelConfig.from_file(path)
