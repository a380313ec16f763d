"""Files shipped inside the package (real MiniCPM4 config and tokenizer), so random checkpoints and the demo
work on a machine that has no downloaded model."""

from __future__ import annotations

from pathlib import Path

_ROOT = Path(__file__).resolve().parent


def asset_dir(name: str) -> Path:
    """The folder of a shipped asset set, e.g. asset_dir("minicpm4-0.5b")."""
    path = _ROOT / name
    if not path.is_dir():
        known = sorted(p.name for p in _ROOT.iterdir() if p.is_dir() and not p.name.startswith("_"))
        raise FileNotFoundError(f"no shipped asset folder {name!r} (have: {', '.join(known)})")
    return path
