"""Hugging Face format checkpoints: config.json + safetensors (single file or sharded with an index).

Models are built on the meta device and each tensor is read straight into its final device and dtype, so a load
never holds a second full copy. Pickled .bin weights are refused, never unpickled. Names are the HF names.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import ModelConfig, SparseConfig
from ..errors import CheckpointError
from .builtin import builtin_names, builtin_path
from .minicpm4 import MiniCPM4ForCausalLM

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def parse_dtype(dtype, device: torch.device | None = None, config: ModelConfig | None = None) -> torch.dtype:
    """None/'auto': the checkpoint's torch_dtype on CUDA, float32 on CPU (bf16 matmuls are slow there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device is not None and torch.device(device).type == "cuda" and config is not None:
            return DTYPES[config.torch_dtype]
        return torch.float32
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r} (use one of: auto, {', '.join(sorted(DTYPES))})")
    return DTYPES[dtype]


def resolve_model_path(name: str | os.PathLike) -> Path:
    """A local folder, a built-in model name (models/builtin.py; a local folder of the same name wins), or a
    Hugging Face hub id resolved through huggingface_hub (its cache, HF_HUB_OFFLINE)."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    s = str(name)
    if p.exists():
        raise CheckpointError(f"{p}: is a file; a model is a folder with config.json and *.safetensors")
    builtin = builtin_path(s)
    if builtin is not None:
        return builtin
    if s.startswith((".", "/", "~")) or not _HUB_ID.match(s):
        raise CheckpointError(f"{s}: no such model folder (a model is a folder, a hub id such as "
                              f"openbmb/MiniCPM4-0.5B, or a built-in name: {', '.join(builtin_names())})")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise CheckpointError(f"{s}: not a local folder; to fetch it from the Hugging Face hub install "
                              f"huggingface_hub (pip install 'longcpm[hub]')") from e
    try:
        return Path(snapshot_download(repo_id=s, allow_patterns=_HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated, network: one clear line
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        why = "HF_HUB_OFFLINE is set and it is not in the local hub cache" if offline else type(e).__name__
        raise CheckpointError(f"{s}: not a local folder and could not be fetched from the hub ({why}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> file, from the index (sharded) or from the single model.safetensors."""
    index = folder / INDEX_NAME
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from e
        missing = sorted({f for f in wm.values() if not (folder / f).exists()})
        if missing:
            raise CheckpointError(f"{index}: shard files missing: {', '.join(missing)}")
        return {name: folder / f for name, f in wm.items()}
    single = folder / SINGLE_NAME
    files = [single] if single.exists() else sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(f.name for f in folder.glob("*.bin")) + sorted(f.name for f in folder.glob("*.pt*"))
        if pickles:
            raise CheckpointError(f"{folder}: only pickled weights ({', '.join(pickles)}); pickles can run code and "
                                  f"are refused. Convert them to safetensors first.")
        raise CheckpointError(f"{folder}: no *.safetensors weights found")
    out: dict[str, Path] = {}
    for f in files:
        for name in _keys(f):
            out[name] = f
    return out


def _keys(f: Path) -> list[str]:
    try:
        with safe_open(str(f), framework="pt") as h:
            return list(h.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e


def _shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        try:
            with safe_open(str(f), framework="pt") as h:
                keys = set(h.keys())
                for n in names:
                    if n not in keys:
                        raise CheckpointError(f"{f}: the index lists '{n}' but the file does not hold it")
                    shapes[n] = tuple(h.get_slice(n).get_shape())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
    return shapes


def build_model(config: ModelConfig, device="meta") -> MiniCPM4ForCausalLM:
    with torch.device(device):
        return MiniCPM4ForCausalLM(config)


def load_model(path, device=None, dtype=None, *, sparse_config: SparseConfig | dict | None | str = "config",
               progress: bool | None = None) -> MiniCPM4ForCausalLM:
    """Load a MiniCPM-family checkpoint folder (or hub id, or built-in name such as "needle-27m") into an eval-mode
    torch.nn.Module.

    sparse_config: "config" keeps the checkpoint's; None forces dense; a SparseConfig/dict replaces it.
    """
    folder = resolve_model_path(path)
    config = ModelConfig.from_file(folder / "config.json")
    if sparse_config != "config":
        config = config.with_sparse(SparseConfig.from_dict(sparse_config, source="sparse_config argument"))
    device = torch.device(device) if device is not None else torch.device("cpu")
    dt = parse_dtype(dtype, device, config)
    files = weight_files(folder)
    model = build_model(config)
    expected = dict(model.named_parameters())  # a tied lm_head is shared with embed_tokens and not listed
    shapes = _shapes(files)
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected) - ignorable - {n for n in shapes if n.endswith("rotary_emb.inv_freq")})
    wrong = sorted(f"{n}: checkpoint {list(shapes[n])} vs model {list(expected[n].shape)}"
                   for n in set(expected) & set(shapes) if tuple(expected[n].shape) != shapes[n])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes ({len(wrong)}): {'; '.join(wrong)}")
        raise CheckpointError(f"{folder}: checkpoint does not match the config: " + " | ".join(parts))

    total_bytes = sum(p.numel() for p in expected.values()) * torch.finfo(dt).bits // 8
    show = progress if progress is not None else total_bytes > (2 << 30)
    from tqdm.auto import tqdm
    bar = tqdm(total=len(expected), desc=f"loading {folder.name}", unit="tensor", disable=not show)
    by_file: dict[Path, list[str]] = {}
    for n in expected:
        by_file.setdefault(files[n], []).append(n)
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt", device="cpu") as h:
            for n in names:
                t = h.get_tensor(n).to(device=device, dtype=dt)
                _assign(model, n, t)
                bar.update(1)
    bar.close()
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.reset_buffers(device)
    model.source_dir = folder
    return model.eval()


def _assign(model: nn.Module, name: str, t: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)


def save_model(model: MiniCPM4ForCausalLM, path, *, max_shard_bytes: int = 5 << 30, dtype=None) -> Path:
    """Write config.json and safetensors (sharded with an index above max_shard_bytes), HF names unchanged."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    dt = parse_dtype(dtype) if dtype is not None else None
    tensors = {}
    for n, p in model.named_parameters():
        t = p.detach()
        if dt is not None:
            t = t.to(dt)
        tensors[n] = t.contiguous().cpu()
    if dt is not None:
        from dataclasses import replace
        config = replace(config, torch_dtype={torch.float32: "float32", torch.bfloat16: "bfloat16",
                                              torch.float16: "float16"}[dt])
    config.save(path / "config.json")
    for old in list(path.glob("model*.safetensors")) + [path / INDEX_NAME]:
        if old.exists():
            old.unlink()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for n, t in tensors.items():
        nb = t.numel() * t.element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][n] = t
        size += nb
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_NAME), metadata=meta)
        return path
    weight_map = {}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata=meta)
        weight_map.update({n: fname for n in shard})
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path
