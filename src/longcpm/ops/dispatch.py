"""The one place where an op's backend is chosen: "naive" (PyTorch reference) or "triton"."""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("naive", "triton")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str | None, x: torch.Tensor) -> str:
    """None -> LONGCPM_BACKEND if set, else triton on CUDA tensors and naive otherwise. The CPU interpreter
    (TRITON_INTERPRET=1) runs only when asked for explicitly with backend="triton"."""
    if backend is None:
        backend = os.environ.get("LONGCPM_BACKEND") or None
    if backend is None:
        backend = "triton" if x.is_cuda and triton_available() else "naive"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' requested but triton is not installed (pip install 'longcpm[gpu]')")
    if backend == "triton" and not x.is_cuda and not interpreting():
        raise RuntimeError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    return backend
