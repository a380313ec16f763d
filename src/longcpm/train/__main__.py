"""`python -m longcpm.train RUN.toml [--set section.key=value ...]` (also under torchrun)."""

from __future__ import annotations

import argparse
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def parse_set(items: list[str]) -> dict:
    """section.key=value pairs; the value is read as a TOML value when it parses as one, else as a string."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects section.key=value, got {item!r}")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m longcpm.train", description="Train a MiniCPM4 model from a RUN.toml")
    p.add_argument("run_toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one key of the run file (repeatable)")
    args = p.parse_args(argv)
    from ..errors import LongcpmError
    from .trainer import main as train_main
    try:
        train_main(args.run_toml, parse_set(args.overrides))
    except LongcpmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
