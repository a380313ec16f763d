"""Fixtures for the trainer tests: the packaged tokenizer and a writer of small RUN.toml files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longcpm.assets import asset_dir

TINY_SPARSE = {"kernel_size": 8, "kernel_stride": 4, "block_size": 16, "window_size": 32, "topk": 4,
               "lse_kernel_size": 32, "lse_kernel_stride": 16, "dense_len": 64}


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    return repr(v)


def write_toml(path: Path, raw: dict) -> Path:
    lines = []
    for section, body in raw.items():
        scalars = {k: v for k, v in body.items() if k != "sources"}
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in scalars.items()]
        for src in body.get("sources", []):
            lines.append(f"[[{section}.sources]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in src.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class ByteTokenizer:
    """Bytes + 3 as token ids (BOS 1, EOS 2): shards whose ids fit a 512-token vocabulary, so trainer tests do not
    pay for the real 73448-wide lm_head."""

    eos_token_id = 2

    def encode(self, text: str) -> list[int]:
        return [1] + [b + 3 for b in text.encode()]


def byte_shards(path: Path) -> Path:
    from longcpm.train.data import tokenize_files
    rng = __import__("random").Random(0)
    words = "alpha beta gamma delta river stone cloud seven nine quiet".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) for _ in range(60)]
    src = path.parent / f"{path.name}.jsonl"
    src.write_text("".join(__import__("json").dumps({"text": d}) + "\n" for d in docs))
    return tokenize_files([src], path, ByteTokenizer(), shard_tokens=2000)


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory) -> Path:
    return byte_shards(tmp_path_factory.mktemp("bytes") / "shards")


def tiny_run(out_dir: Path, shards: Path | None = None, **sections) -> dict:
    """A raw RUN.toml dict for a 2-layer hidden-32 model; with `shards` (a byte_shards folder) the vocabulary is
    512 and the data the byte shards, else the real vocabulary on synthetic passkey documents. Keyword sections
    update it."""
    overrides = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
    if shards is not None:
        overrides["vocab_size"] = 512
        sources = [{"type": "shards", "path": str(shards)}]
    else:
        sources = [{"type": "synthetic", "tasks": ["passkey"], "min_len": 40, "max_len": 150}]
    raw = {
        "model": {"init": "tiny", "overrides": overrides, "attention": "dense"},
        "data": {"seq_len": 64, "micro_batch": 1, "grad_accum": 2, "sources": sources},
        "optim": {"lr": 1e-2, "weight_decay": 0.1},
        "schedule": {"warmup_steps": 2, "decay_fraction": 0.5, "shape": "exp"},
        "run": {"steps": 6, "seed": 3, "out_dir": str(out_dir), "progress": False, "device": "cpu"},
    }
    for name, body in sections.items():
        raw[name] = {**raw.get(name, {}), **body}
    return raw


@pytest.fixture(scope="session")
def tokenizer():
    from longcpm.text import load_tokenizer
    return load_tokenizer(asset_dir("minicpm4-0.5b"))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes run fastest on one thread, and a busy 2-core machine makes 2 spinning threads far slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
