"""longcpm: fast long-context MiniCPM4 models with InfLLM-V2 dense/sparse switchable attention.

    import longcpm
    llm = longcpm.LLM("path/to/checkpoint")
    out = llm.generate(["Hello"], longcpm.SamplingParams(temperature=0, max_tokens=32))
    print(out[0].outputs[0].text)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "longcpm.config",
    "SparseConfig": "longcpm.config",
    "load_config": "longcpm.config",
    "load_model": "longcpm.models.checkpoint",
    "save_model": "longcpm.models.checkpoint",
    "LLM": "longcpm.engine",
    "SamplingParams": "longcpm.engine",
    "RequestOutput": "longcpm.engine",
    "load_tokenizer": "longcpm.text",
    "LongcpmError": "longcpm.errors",
}

__all__ = list(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    # lazy: `import longcpm` stays cheap (no triton, no tokenizer) until a name is used
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'longcpm' has no attribute {name!r}")
