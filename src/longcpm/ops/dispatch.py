"""The one place where an op's backend is chosen.

"naive": the PyTorch reference (readable, fp32, one sequence at a time; the ground truth of every test).
"torch": efficient plain PyTorch, CPU or GPU (infllmv2_attention only: infllmv2/blocked.py).
"triton": the GPU kernels (or the CPU interpreter with TRITON_INTERPRET=1).

Default: triton for CUDA tensors when triton is installed; otherwise "torch" for the ops that have it, "naive"
for the rest. LONGCPM_BACKEND (or backend=) overrides; "torch" asked of an op without a torch implementation
runs its naive one, which is plain PyTorch too.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("naive", "torch", "triton")
REFERENCE_ONLY = ("naive", "triton")  # the backends of an op without a "torch" implementation


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str | None, x: torch.Tensor, supported: tuple[str, ...] = REFERENCE_ONLY) -> str:
    """The backend an op with implementations `supported` runs for tensor x. None -> LONGCPM_BACKEND if set,
    else triton on CUDA tensors (when installed), else "torch" if supported, else naive. "torch" on an op
    without one -> naive. The CPU interpreter (TRITON_INTERPRET=1) runs only when asked for explicitly with
    backend="triton"."""
    if backend is None:
        backend = os.environ.get("LONGCPM_BACKEND") or None
    if backend is None:
        backend = "triton" if x.is_cuda and triton_available() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "torch" and "torch" not in supported:
        backend = "naive"
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' requested but triton is not installed (pip install 'longcpm[gpu]')")
    if backend == "triton" and not x.is_cuda and not interpreting():
        raise RuntimeError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    return backend
