"""OpenAI-compatible HTTP server over the async engine (`longcpm serve`; needs the `server` extra).

create_app is imported lazily so that `longcpm --help` and the CLI wiring work without FastAPI installed.
"""

from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'longcpm.server' has no attribute {name!r}")
