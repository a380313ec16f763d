"""Built-in models: small trained checkpoints shipped inside the package (longcpm/assets), usable by a short name
wherever a model folder or hub id is accepted: `longcpm generate --model needle-27m`, `LLM("needle-27m")`,
`load_model("needle-27m")`, `longcpm eval --model needle-27m`.

Name resolution: an existing local folder wins over a built-in of the same name (as it does over a hub id), so
`./needle-27m` in the working directory shadows the built-in; the listing (`longcpm info`) shows what a name
resolves to. Any other string is returned unchanged, for the caller to treat as a folder or hub id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..assets import asset_dir
from ..errors import CheckpointError


@dataclass(frozen=True)
class BuiltinModel:
    folder: str  # the folder name under longcpm/assets
    description: str  # one line


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "needle-27m": BuiltinModel(
        "needle-27m",
        "27.5M-parameter MiniCPM4 (8 layers, hidden 256, GQA 8:1) trained dense then InfLLM-V2 sparse on "
        "RULER-style tasks up to 32K tokens; `longcpm demo` runs it"),
}


def builtin_names() -> list[str]:
    return list(BUILTIN_MODELS)


def builtin_path(name) -> Path | None:
    """The shipped folder of a built-in model name; None when name is not a built-in name."""
    entry = BUILTIN_MODELS.get(str(name)) if isinstance(name, (str, os.PathLike)) else None
    if entry is None:
        return None
    try:
        return asset_dir(entry.folder)
    except FileNotFoundError as e:
        raise CheckpointError(f"built-in model {name!r}: its files are missing from this installation ({e}); "
                              f"reinstall longcpm") from None


def resolve_model_path(name_or_path) -> str:
    """A built-in name -> its shipped folder (as a string); anything else unchanged (as a string). An existing
    local folder with a built-in's name wins over the built-in."""
    s = os.fspath(name_or_path)
    if Path(s).expanduser().is_dir():
        return s
    path = builtin_path(s)
    return str(path) if path is not None else s


def describe_builtins() -> list[str]:
    """One line per built-in model: name, whether its weights are present, description."""
    lines = []
    for name, entry in BUILTIN_MODELS.items():
        try:
            folder = asset_dir(entry.folder)
            ok = (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
        except FileNotFoundError:
            ok = False
        lines.append(f"{name:<12} {entry.description}{'' if ok else ' [files missing]'}")
    return lines
