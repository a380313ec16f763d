"""examples/train/widen.py: the widened checkpoint loads and computes the same logits (noise 0), and noise makes
the copies differ."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

from longcpm import load_model
from longcpm.models.builtin import builtin_path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train" / "widen.py"


def _run(dst: Path, *args: str) -> None:
    subprocess.run([sys.executable, str(SCRIPT), str(builtin_path("needle-27m")), str(dst), *args], check=True,
                   capture_output=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})


def test_widened_model_computes_the_same_function(tmp_path):
    _run(tmp_path / "wide", "--factor", "2", "--noise", "0")
    ids = torch.randint(0, 73448, (2, 150), generator=torch.Generator().manual_seed(0))
    base = load_model(builtin_path("needle-27m"), device="cpu", dtype=torch.float32)
    wide = load_model(tmp_path / "wide", device="cpu", dtype=torch.float32)
    assert wide.config.num_attention_heads == 16 and wide.config.num_key_value_heads == 2
    with torch.no_grad():
        a, b = base(ids), wide(ids)
    # bf16 weights: o_proj / 2 is exact, so only summation order differs
    torch.testing.assert_close(b, a, atol=2e-3, rtol=2e-3)


def test_noise_separates_the_copies():
    spec = importlib.util.spec_from_file_location("widen", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = {"num_attention_heads": 4, "num_key_value_heads": 1}
    state = {"l.self_attn.k_proj.weight": torch.randn(8, 16), "l.self_attn.q_proj.weight": torch.randn(32, 16),
             "l.self_attn.o_proj.weight": torch.randn(16, 32), "l.self_attn.v_proj.weight": torch.randn(8, 16)}
    out, new = mod.widen_state(state, cfg, 2, 0.01)
    k = out["l.self_attn.k_proj.weight"]
    assert k.shape == (16, 16) and not torch.equal(k[:8], k[8:]) and torch.allclose(k[:8], k[8:], atol=0.2)
    assert torch.equal(k[:8], state["l.self_attn.k_proj.weight"])
    assert out["l.self_attn.o_proj.weight"].shape == (16, 64) and new["num_key_value_heads"] == 2
