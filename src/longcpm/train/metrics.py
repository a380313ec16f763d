"""Training FLOPs, MFU and the metrics JSONL file.

FLOPs per optimizer step (the usual dense-transformer estimate, forward + backward = 3 × forward):
    6 · N_matmul · tokens                      N_matmul = weights used in matmuls (layers + lm_head; the
                                               embedding lookup is free, a tied lm_head counts once)
  + 12 · L · HQ · D · Σ_tokens ctx(t)          attention scores and values: 2 matmuls × 2 flops, × 3 for training;
                                               ctx(t) = keys the token attends (t + 1 dense-causal within its
                                               document; min(t + 1, budget) on the InfLLM-V2 sparse path)
  + 2 · L · HQ · D · Σ_tokens (n_c1 + n_c2)    sparse only: stage-1 scores against the compressed keys, forward
                                               only (selection has no gradient)
MFU = FLOPs / (seconds · world · peak); peak = bf16 dense tensor-core FLOP/s of the GPU (run.peak_tflops, or a
table of known GPUs). Padding rows and recomputation from activation checkpointing are not counted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..config import ModelConfig, SparseConfig

# bf16 dense (no sparsity) tensor-core peak, FLOP/s
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
              "4090": 165e12}


def matmul_params(config: ModelConfig) -> int:
    h, i, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return L * (2 * h * q + 2 * h * kv + 3 * h * i) + V * h


def sparse_budget(sc: SparseConfig) -> int:
    """Keys a sparse query attends at most: selected blocks (window included for v2; v1 adds the window)."""
    return sc.budget * sc.block_size + (sc.window_size if sc.variant == "v1" else 0)


def attention_pairs(doc_lens, sparse: SparseConfig | None, attention: str = "auto") -> tuple[float, float]:
    """(Σ ctx(t) over all tokens, Σ compressed keys scored in stage 1) for documents of these lengths."""
    pairs = comp = 0.0
    for n in map(int, doc_lens):
        is_sparse = sparse is not None and attention != "dense" and (attention == "sparse" or sparse.is_sparse(n))
        t = np.arange(n, dtype=np.float64)
        if not is_sparse:
            pairs += float((t + 1).sum())
            continue
        pairs += float(np.minimum(t + 1, sparse_budget(sparse)).sum())
        n1 = np.maximum((t + 1 - sparse.kernel_size) // sparse.kernel_stride + 1, 0)
        n2 = np.maximum((t + 1 - sparse.lse_kernel_size) // sparse.lse_kernel_stride + 1, 0) if sparse.uses_c2() else 0
        comp += float((n1 + n2).sum())
    return pairs, comp


def step_flops(config: ModelConfig, doc_lens, attention: str = "auto") -> float:
    """Training FLOPs of one pass over documents of these lengths (see the module docstring)."""
    tokens = float(sum(map(int, doc_lens)))
    pairs, comp = attention_pairs(doc_lens, config.sparse_config, attention)
    per = config.num_hidden_layers * config.num_attention_heads * config.head_dim
    return 6.0 * matmul_params(config) * tokens + 12.0 * per * pairs + 2.0 * per * comp


def peak_flops(device_name: str | None, override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for key, val in PEAK_FLOPS.items():
        if device_name and key in device_name:
            return val
    return None


class MetricsLog:
    """Appends one JSON object per line. On resume, records past the checkpoint step are dropped first, so the
    file reads like one uninterrupted run."""

    def __init__(self, path: str | os.PathLike, resume_step: int = 0, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step > 0 and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
