"""Copy a trained model folder in another dtype and shard size: the packaged bf16 copy of needle-11m, or an fp32
copy cut into shards small enough to move between machines.

    python examples/train/export.py runs/needle-11m/3_long_sparse/final src/longcpm/assets/needle-11m
"""

import argparse
import shutil
from pathlib import Path

import torch

from longcpm.models.checkpoint import load_model, save_model
from longcpm.text.tokenizer import TOKENIZER_FILES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--shard-mb", type=float, default=1024.0, help="largest safetensors shard in MiB")
    a = p.parse_args()
    model = load_model(a.src, "cpu", torch.float32)
    dst = Path(a.dst)
    dst.mkdir(parents=True, exist_ok=True)
    for old in dst.glob("model*.safetensors*"):
        old.unlink()
    save_model(model, dst, dtype=a.dtype, max_shard_bytes=int(a.shard_mb * 2**20))
    for f in TOKENIZER_FILES + ("added_tokens.json", "generation_config.json"):
        if (Path(a.src) / f).is_file():
            shutil.copy2(Path(a.src) / f, dst / f)
    print(f"{a.src} -> {dst} ({a.dtype}): " + ", ".join(sorted(x.name for x in dst.iterdir())))


if __name__ == "__main__":
    main()
