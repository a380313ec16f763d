"""examples/train/spread_embeddings.py: the chosen rows move apart around their mean with their norms kept, the
other rows stay, and bad arguments fail clearly."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train" / "spread_embeddings.py"
spec = importlib.util.spec_from_file_location("spread_embeddings", SCRIPT)
spread = importlib.util.module_from_spec(spec)
spec.loader.exec_module(spread)


def _mean_cos(x: torch.Tensor) -> float:
    x = torch.nn.functional.normalize(x, dim=-1)
    return float(((x @ x.T).sum() - len(x)) / (len(x) * (len(x) - 1)))


def test_rows_spread_with_norms_kept():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 16, generator=g) * 0.1 + torch.randn(16, generator=g)  # rows near one direction
    ids = torch.tensor([3, 7, 11, 20, 21, 40])
    out = spread.spread_rows(table, ids, 4.0)
    assert _mean_cos(out[ids]) < _mean_cos(table[ids]) - 0.1
    assert torch.allclose(out[ids].norm(dim=-1), table[ids].norm(dim=-1), atol=1e-5)
    rest = torch.ones(50, dtype=torch.bool)
    rest[ids] = False
    assert torch.equal(out[rest], table[rest])
    # factor 1 changes nothing; the mean direction of the set is kept
    assert torch.allclose(spread.spread_rows(table, ids, 1.0), table, atol=1e-6)
    assert torch.nn.functional.cosine_similarity(out[ids].mean(0), table[ids].mean(0), dim=0) > 0.9


@pytest.mark.parametrize("ids, factor, match", [
    (torch.tensor([1, 2]), 0.0, "factor"),
    (torch.tensor([1]), 2.0, "two rows"),
    (torch.tensor([1, 99]), 2.0, "token ids"),
])
def test_bad_arguments(ids, factor, match):
    with pytest.raises(ValueError, match=match):
        spread.spread_rows(torch.randn(10, 4), ids, factor)
