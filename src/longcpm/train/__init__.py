"""Training: `main(RUN.toml)` runs the trainer (DDP / FSDP2 under torchrun); the schedule, μP groups, data and
synthetic tasks are usable on their own. Imports config, ops, layers, kvcache, models and text; never the engine."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "main": "longcpm.train.trainer",
    "Trainer": "longcpm.train.trainer",
    "measure_throughput": "longcpm.train.trainer",
    "chunked_cross_entropy": "longcpm.train.trainer",
    "RunConfig": "longcpm.train.config",
    "load_run_config": "longcpm.train.config",
    "WSD": "longcpm.train.schedule",
    "wsd_lr": "longcpm.train.schedule",
    "wsd_scheduler": "longcpm.train.schedule",
    "mup_param_groups": "longcpm.train.mup",
    "mup_init_": "longcpm.train.mup",
    "tokenize_files": "longcpm.train.data",
    "generate_synthetic": "longcpm.train.synthetic",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # lazy, so `python -m longcpm.train` and light users (the schedule alone) do not import the model stack
    if name in _EXPORTS:
        attr = "generate" if name == "generate_synthetic" else name
        return getattr(importlib.import_module(_EXPORTS[name]), attr)
    raise AttributeError(f"module 'longcpm.train' has no attribute {name!r}")
