"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 give the loss of one process with the same global batch,
rank 0 writes loadable checkpoints, and an FSDP2 run resumes from its sharded-then-gathered optimizer state."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longcpm.models.checkpoint import load_model
from longcpm.train.checkpointing import atomic_write_text, read_state
from longcpm.train.metrics import read_metrics

from .conftest import tiny_run, write_toml

SRC = Path(__file__).resolve().parents[2] / "src"


def _torchrun(toml: Path, nproc: int = 2) -> None:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "longcpm.train", str(toml)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory, shards_dir):
    """One process, 2 rows per micro-batch × 2 accumulation steps = the 2-rank global batch of 4 rows."""
    from longcpm.train.trainer import main
    out = tmp_path_factory.mktemp("single") / "run"
    raw = tiny_run(out, shards_dir, data={"micro_batch": 2}, run={"steps": 4, "save_every": 2})
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    main(write_toml(out.parent / "run.toml", raw))
    torch.set_num_threads(n)
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path, shards_dir, single, parallel):
    out = tmp_path / parallel
    raw = tiny_run(out, shards_dir, data={"micro_batch": 1}, run={"steps": 4, "save_every": 2, "parallel": parallel})
    toml = write_toml(tmp_path / "run.toml", raw)
    _torchrun(toml)
    want, got = _losses(single), _losses(out)
    assert len(got) == 4 and read_state(out / "checkpoints" / "step_000004")["world"] == 2
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    a, b = load_model(single / "final"), load_model(out / "final")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)
    if parallel == "fsdp":
        # resume from step 2 (optimizer state gathered to rank 0, re-sharded on load): the same curve
        first = _losses(out)
        shutil.rmtree(out / "checkpoints" / "step_000004")
        shutil.rmtree(out / "final")
        atomic_write_text(out / "checkpoints" / "latest", "step_000002\n")
        _torchrun(toml)
        assert _losses(out) == first
