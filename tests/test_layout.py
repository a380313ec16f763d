"""The package layout stays one-directional: a module imports only from its own level or below, and files stay small."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "longcpm"

# level of each top-level subpackage/module of longcpm (see README "Layout")
LEVELS = {
    "errors": 0, "config": 0, "assets": 0,
    "ops": 1, "text": 1,
    "layers": 2, "kvcache": 2,
    "models": 3,
    "spec": 4, "quant": 4,
    "engine": 5, "train": 5, "eval": 5,
    "server": 6, "cli": 6,
    "__init__": 7, "__main__": 7,
}
# same level, still forbidden: the engine and the trainer never import each other
FORBIDDEN = {("engine", "train"), ("train", "engine")}


def package_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    rel_parts = path.relative_to(SRC).parts
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("longcpm."):
                    out.add(node.module.split(".")[1])
                continue
            # relative import: resolve against this file's package
            base = list(rel_parts[:-1])
            up = node.level - 1
            base = base[: len(base) - up] if up else base
            target = base + (node.module.split(".") if node.module else [])
            if target:
                out.add(target[0])
            else:  # "from .. import x" at the package root
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("longcpm."):
                    out.add(a.name.split(".")[1])
    return out


FILES = sorted(p for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_upward_imports(path):
    me = package_of(path)
    assert me in LEVELS, f"{me} has no level in tests/test_layout.py LEVELS; add it"
    for dep in imported_packages(path):
        if dep not in LEVELS or dep == me:
            continue
        assert LEVELS[dep] <= LEVELS[me], f"{path.relative_to(SRC)} ({me}, L{LEVELS[me]}) imports {dep} (L{LEVELS[dep]})"
        assert (me, dep) not in FORBIDDEN, f"{me} must not import {dep}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_file_size(path):
    lines = len(path.read_text().splitlines())
    limit = 1000 if path.parent.name in ("infllmv2", "lightning", "quant") else 600
    assert lines <= limit, f"{path.relative_to(SRC)} has {lines} lines (limit {limit}): split it"
