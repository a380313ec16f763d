"""Training checkpoints: a Hugging Face model folder (what `load_model` reads) plus `trainer_state.pt` (optimizer,
scheduler step, RNG states, data position, step), written atomically.

Layout: <out_dir>/checkpoints/step_000100/{config.json, model.safetensors, tokenizer files, trainer_state.pt} and
<out_dir>/checkpoints/latest (the name of the newest complete one). A checkpoint folder is filled under a temp
name and renamed into place, and `latest` is replaced the same way, so a crash leaves either the old or the new
checkpoint, never half of one. trainer_state.pt holds only tensors and plain containers (read with
weights_only=True: nothing in it can run code).
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_dir(final: Path, fill: Callable[[Path], None]) -> Path:
    """Build a folder with fill(tmp) and rename it to `final` (replacing an older folder of that name)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    fill(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def rng_state() -> dict:
    """Python, numpy, torch CPU and (when present) CUDA generator states, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, step: int, write_model: Callable[[Path], None], state: dict,
                    keep: int = 2) -> Path:
    """Write checkpoints/step_<step> (model via write_model, then trainer_state.pt), point `latest` at it and
    delete all but the newest `keep` step folders."""
    root = Path(out_dir) / "checkpoints"

    def fill(tmp: Path) -> None:
        write_model(tmp)
        torch.save(state, tmp / STATE_FILE)

    path = atomic_dir(root / step_dir_name(step), fill)
    atomic_write_text(root / LATEST, path.name + "\n")
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    pointer = Path(out_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def read_state(path: str | os.PathLike, map_location="cpu") -> dict:
    f = Path(path) / STATE_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no {STATE_FILE}; not a training checkpoint (written by longcpm.train)")
    return torch.load(f, map_location=map_location, weights_only=True)
