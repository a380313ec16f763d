"""RUN.toml: one training run as typed dataclasses. Every key is checked; an unknown or mistyped key fails with
a ConfigError naming the key and the file. Relative paths are taken from the working directory.

    [model]      init = "tiny" | a config.json / model folder (fresh random init), or checkpoint = HF folder;
                 overrides = {config.json keys}, sparse_config = {...} | false, attention, mup_lr, mup_init
    [data]       seq_len, micro_batch (rows per forward per rank), grad_accum, tokenizer, pack, [[data.sources]]
                 (type = "shards", path | type = "synthetic", tasks, task_weights, min_len, max_len, loss,
                 prompt_labels, workers; weight)
    [optim]      lr, weight_decay, betas, eps, clip
    [schedule]   warmup_steps, decay_fraction | decay_steps | decay_start, shape, final_ratio, half_life
    [run]        steps, seed, out_dir, dtype, device, parallel, activation_checkpointing, log_every, save_every,
                 eval_every, eval_rows, keep_checkpoints, resume, branch_from, progress, loss_chunk, peak_tflops
"""

from __future__ import annotations

import copy
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..errors import ConfigError
from .schedule import SHAPES, WSD
from .synthetic import TASKS, TRAIN_TASKS

_UNSET = "__keep__"  # sparse_config not given: keep the model's own


@dataclass
class ModelSection:
    init: str | None = None
    checkpoint: str | None = None
    overrides: dict = field(default_factory=dict)
    sparse_config: Any = _UNSET  # dict: switch InfLLM-V2 on / replace it; false: force dense
    attention: str = "auto"
    dense_fraction: float = 0.0  # sparse/auto runs: this share of the steps (a seeded coin per step) runs dense
    mup_lr: bool = True
    mup_init: bool = False
    init_seed: int | None = None


@dataclass
class SourceSpec:
    type: str
    weight: float = 1.0
    path: str | None = None
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    task_weights: list[float] | None = None
    min_len: int = 256
    max_len: int = 1024
    seed: int | None = None
    loss: str = "all"  # synthetic: "answer" = labels on the answer and EOS only
    prompt_labels: float = 0.0  # synthetic, loss "answer": share of prompt tokens that are targets too
    workers: int = 0   # synthetic: processes generating documents ahead of the packer


@dataclass
class DataSection:
    seq_len: int = 2048
    micro_batch: int = 1
    grad_accum: int = 1
    tokenizer: str | None = None
    pack: str = "split"  # "pad": whole documents per row, the rest padded (a document never loses its start)
    sources: list[SourceSpec] = field(default_factory=list)


@dataclass
class OptimSection:
    lr: float = 1e-2
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    clip: float = 1.0


@dataclass
class ScheduleSection:
    warmup_steps: int = 0
    decay_fraction: float = 0.1
    decay_steps: int | None = None
    decay_start: int | None = None
    shape: str = "exp"
    final_ratio: float = 0.1
    half_life: float | None = None


@dataclass
class RunSection:
    steps: int = 100
    seed: int = 0
    out_dir: str = "runs/run"
    dtype: str = "auto"
    device: str = "auto"
    parallel: str = "ddp"
    activation_checkpointing: bool = False
    log_every: int = 1
    save_every: int = 0
    eval_every: int = 0
    eval_rows: int = 4
    keep_checkpoints: int = 2
    resume: bool = True
    branch_from: str | None = None
    progress: bool = True
    loss_chunk: int = 4096
    peak_tflops: float | None = None


@dataclass
class RunConfig:
    model: ModelSection
    data: DataSection
    optim: OptimSection
    schedule: ScheduleSection
    run: RunSection
    source: str = "RUN.toml"
    raw: dict = field(default_factory=dict, repr=False)

    def wsd(self) -> WSD:
        s = self.schedule
        return WSD(total_steps=self.run.steps, warmup_steps=s.warmup_steps, decay_fraction=s.decay_fraction,
                   decay_steps=s.decay_steps, decay_start=s.decay_start, shape=s.shape, final_ratio=s.final_ratio,
                   half_life=s.half_life)


_SECTIONS = {"model": ModelSection, "data": DataSection, "optim": OptimSection, "schedule": ScheduleSection,
             "run": RunSection}
_CHOICES = {"model.attention": ("auto", "dense", "sparse"), "schedule.shape": SHAPES,
            "run.dtype": ("auto", "float32", "bfloat16"), "run.parallel": ("ddp", "fsdp"),
            "data.sources.type": ("shards", "synthetic"), "data.sources.loss": ("all", "answer"),
            "data.pack": ("split", "pad")}


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if tp is dict:
        return isinstance(value, dict)
    return isinstance(value, tp)


def _build(cls, d: Any, where: str, source: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: [{where}] must be a table, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in d:
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{where}.{key}' (known keys of [{where}]: {', '.join(sorted(known))})")
    kwargs = {}
    for key, value in d.items():
        name = f"{where}.{key}"
        if cls is DataSection and key == "sources":
            if not isinstance(value, list):
                raise ConfigError(f"{source}: '{name}' must be an array of tables ([[data.sources]])")
            kwargs[key] = [_build(SourceSpec, s, f"data.sources[{i}]", source) for i, s in enumerate(value)]
            continue
        if not _type_ok(value, hints[key]):
            want = getattr(hints[key], "__name__", None) or str(hints[key]).replace("typing.", "")
            raise ConfigError(f"{source}: key '{name}' must be {want}, got {value!r}")
        choices = _CHOICES.get(name) or _CHOICES.get(f"data.sources.{key}" if cls is SourceSpec else "")
        if choices and value not in choices:
            raise ConfigError(f"{source}: key '{name}' must be one of {', '.join(map(repr, choices))}, got {value!r}")
        kwargs[key] = value
    if cls is SourceSpec and "type" not in kwargs:
        raise ConfigError(f"{source}: [{where}] needs a 'type' (\"shards\" or \"synthetic\")")
    return cls(**kwargs)


def apply_overrides(raw: dict, overrides: dict | None) -> dict:
    """{"run.steps": 4, "data.sources.0.max_len": 512} -> a copy of the raw TOML dict with those keys set
    (a number indexes an array of tables)."""
    out = copy.deepcopy(raw)
    for dotted, value in (overrides or {}).items():
        keys = dotted.split(".")
        node = out
        for n, p in enumerate(keys):
            last = n == len(keys) - 1
            if isinstance(node, list):
                if not (p.isdigit() and int(p) < len(node)):
                    raise ConfigError(f"override {dotted!r}: {p!r} is not an index of an array of {len(node)}")
                p = int(p)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {keys[n - 1]!r} is a value, not a table")
            elif not last:
                node.setdefault(p, {})
            if last:
                node[p] = value
            else:
                node = node[p]
    return out


def parse_run_config(raw: dict, source: str = "RUN.toml") -> RunConfig:
    for key in raw:
        if key not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section '{key}' (sections: {', '.join(_SECTIONS)})")
    parts = {k: _build(cls, raw.get(k, {}), k, source) for k, cls in _SECTIONS.items()}
    cfg = RunConfig(**parts, source=source, raw=raw)
    _validate(cfg)
    return cfg


def load_run_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such run file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return parse_run_config(apply_overrides(raw, overrides), str(path))


def _validate(cfg: RunConfig) -> None:
    src, m, d, r = cfg.source, cfg.model, cfg.data, cfg.run
    if (m.init is None) == (m.checkpoint is None):
        raise ConfigError(f"{src}: [model] needs exactly one of 'init' (fresh random weights from a config name "
                          f"or path) or 'checkpoint' (a Hugging Face model folder)")
    if m.checkpoint is not None and m.overrides:
        raise ConfigError(f"{src}: 'model.overrides' applies to a fresh init only, not to 'model.checkpoint'")
    if m.sparse_config is not _UNSET and m.sparse_config is not False and not isinstance(m.sparse_config, dict):
        raise ConfigError(f"{src}: key 'model.sparse_config' must be a table or false, got {m.sparse_config!r}")
    positive = {"data.seq_len": d.seq_len, "data.micro_batch": d.micro_batch, "data.grad_accum": d.grad_accum,
                "run.steps": r.steps, "run.log_every": r.log_every, "run.loss_chunk": r.loss_chunk,
                "run.keep_checkpoints": r.keep_checkpoints}
    for name, v in positive.items():
        if v < 1:
            raise ConfigError(f"{src}: key '{name}' must be >= 1, got {v}")
    for name, v in {"run.save_every": r.save_every, "run.eval_every": r.eval_every, "run.eval_rows": r.eval_rows,
                    "optim.weight_decay": cfg.optim.weight_decay, "optim.clip": cfg.optim.clip}.items():
        if v < 0:
            raise ConfigError(f"{src}: key '{name}' must be >= 0, got {v}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"{src}: key 'optim.lr' must be positive, got {cfg.optim.lr}")
    if not 0.0 <= m.dense_fraction <= 1.0:
        raise ConfigError(f"{src}: key 'model.dense_fraction' must be in [0, 1], got {m.dense_fraction}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"{src}: key 'optim.betas' must be two numbers in [0, 1), got {cfg.optim.betas}")
    if not d.sources:
        raise ConfigError(f"{src}: no data: add at least one [[data.sources]] table")
    for i, s in enumerate(d.sources):
        where = f"data.sources[{i}]"
        if s.type == "shards" and not s.path:
            raise ConfigError(f"{src}: [{where}] of type 'shards' needs a 'path' (a tokenize_files folder)")
        if s.type == "synthetic":
            bad = [t for t in s.tasks if t not in TRAIN_TASKS]
            if bad or not s.tasks:
                raise ConfigError(f"{src}: key '{where}.tasks' has unknown tasks {bad} (tasks: {', '.join(TRAIN_TASKS)})")
            if s.task_weights is not None and len(s.task_weights) != len(s.tasks):
                raise ConfigError(f"{src}: key '{where}.task_weights' needs one weight per task")
            if not 0 < s.min_len <= s.max_len:
                raise ConfigError(f"{src}: [{where}] needs 0 < min_len <= max_len, got {s.min_len}, {s.max_len}")
        if s.weight < 0:
            raise ConfigError(f"{src}: key '{where}.weight' must be >= 0")
        if s.workers < 0:
            raise ConfigError(f"{src}: key '{where}.workers' must be >= 0")
        if s.type == "shards" and (s.loss != "all" or s.workers or s.prompt_labels):
            raise ConfigError(f"{src}: [{where}]: 'loss', 'prompt_labels' and 'workers' apply to synthetic sources "
                              f"only")
        if not 0.0 <= s.prompt_labels <= 1.0 or (s.prompt_labels and s.loss != "answer"):
            raise ConfigError(f"{src}: key '{where}.prompt_labels' must be in [0, 1] and needs loss = \"answer\", "
                              f"got {s.prompt_labels!r} with loss = {s.loss!r}")
    try:
        cfg.wsd()
    except ValueError as e:
        raise ConfigError(f"{src}: [schedule]: {e}") from None
