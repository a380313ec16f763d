"""Widen a trained MiniCPM checkpoint's attention: every kv head becomes `factor` kv heads and each query head
`factor` query heads, the GQA group unchanged, so the widened model computes the same function at the start.

Why: issue 6's probe of whether a wider attention path (needle-27m has one 64-dim kv head per layer) learns the
common-word count that more steps of the narrow one did not. Training the wide copy and the original on the same
data compares the two paths from the same skills, which training from scratch in one device call could not.

The copies of a head get the same weights plus a little noise (relative `noise`): exact copies would get the
same gradients and never come apart. o_proj splits each head's columns evenly over its copies, so with noise 0
the output is unchanged (tests/train/test_widen.py checks it).

    python examples/train/widen.py src/longcpm/assets/needle-27m runs/wide --factor 2
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"


def _heads(w: torch.Tensor, n: int) -> torch.Tensor:
    """[n * hd, hidden] -> [n, hd, hidden]"""
    return w.reshape(n, -1, w.shape[-1])


def widen_state(state: dict[str, torch.Tensor], config: dict, factor: int, noise: float,
                seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    hq, hkv = config["num_attention_heads"], config["num_key_value_heads"]
    group = hq // hkv
    gen = torch.Generator().manual_seed(seed)

    def jitter(w: torch.Tensor) -> torch.Tensor:
        if noise == 0:
            return w
        x = w.float()
        return (x + noise * x.std() * torch.randn(x.shape, generator=gen)).to(w.dtype)

    out = {}
    for name, w in state.items():
        if name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.v_proj.weight"):
            kv = _heads(w, hkv)  # kv head j's copies are j, hkv + j, ...
            w = torch.cat([kv] + [jitter(kv) for _ in range(factor - 1)]).reshape(-1, w.shape[-1])
        elif name.endswith("self_attn.q_proj.weight"):
            # query head i uses kv head i // group; the copies keep that order block by block
            q = _heads(w, hq)
            w = torch.cat([q] + [jitter(q) for _ in range(factor - 1)]).reshape(-1, w.shape[-1])
        elif name.endswith("self_attn.o_proj.weight"):
            w = torch.cat([w / factor] * factor, dim=1)
        out[name] = w.contiguous()
    new = dict(config, num_attention_heads=hq * factor, num_key_value_heads=hkv * factor)
    assert new["num_attention_heads"] // new["num_key_value_heads"] == group
    return out, new


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--noise", type=float, default=1e-2, help="relative std of the copies' noise (0: exact)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    config = json.loads((a.src / "config.json").read_text())
    if "head_dim" not in config:
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    state, new = widen_state(load_file(a.src / WEIGHTS), config, a.factor, a.noise, a.seed)
    a.dst.mkdir(parents=True, exist_ok=True)
    for f in a.src.iterdir():
        if f.is_file() and f.name not in (WEIGHTS, "config.json"):
            shutil.copy2(f, a.dst / f.name)
    (a.dst / "config.json").write_text(json.dumps(new, indent=2) + "\n")
    save_file(state, a.dst / WEIGHTS, metadata={"format": "pt"})
    print(f"{a.src} -> {a.dst}: {new['num_attention_heads']} query heads, {new['num_key_value_heads']} kv heads")


if __name__ == "__main__":
    main()
