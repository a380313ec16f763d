"""The training loop: AdamW with μP groups, the WSD schedule, bf16 autocast over fp32 master weights, gradient
accumulation and clipping, packed rows through the model's cu_seqlens path, exact-resume checkpoints.

Loss: token-level cross entropy, i.e. the sum over every labelled token of the global batch (all ranks, all
micro-batches) divided by their count. Every rank reads the whole row stream, so the count is known before the
first forward and each micro-batch backpropagates sum/count directly (× world, because DDP and FSDP average
gradients over ranks). Logits are computed in chunks of run.loss_chunk tokens under activation checkpointing,
so [tokens, vocab] fp32 logits never exist at once.
"""

from __future__ import annotations

import json
import random
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..assets import asset_dir
from ..config import SparseConfig
from ..errors import ConfigError
from ..models.checkpoint import build_model, load_model, save_model
from ..models.random import resolve_config
from ..text import load_tokenizer
from . import distributed as D
from .checkpointing import latest_checkpoint, read_state, rng_state, save_checkpoint, set_rng_state
from .config import _UNSET, RunConfig, load_run_config
from .data import IGNORE, DataMix, Packer, Row, ShardSource, SyntheticSource, collate, rank_slice
from .metrics import MetricsLog, peak_flops, step_flops
from .mup import mup_init_, mup_param_groups
from .schedule import set_scheduler_step, wsd_scheduler


def chunked_cross_entropy(lm: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 4096
                          ) -> torch.Tensor:
    """Sum of token cross entropies (labels == -100 skipped) from final hidden states [.., T, H]. Each chunk's
    logits are recomputed in backward instead of stored."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if (y == IGNORE).any():  # logits only where there is a target (answer-only rows label a few tokens)
        keep = (y != IGNORE).nonzero().squeeze(1)
        h, y = h.index_select(0, keep), y.index_select(0, keep)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        if torch.is_grad_enabled():
            total = total + checkpoint(_ce_sum, lm, h[s: s + chunk], y[s: s + chunk], use_reentrant=False)
        else:
            total = total + _ce_sum(lm, h[s: s + chunk], y[s: s + chunk])
    return total


def _ce_sum(lm, h, y):
    return F.cross_entropy(lm.logits(h), y, ignore_index=IGNORE, reduction="sum")


class LossModule(nn.Module):
    """The LM plus its loss in one forward, so DDP / FSDP2 hooks see every parameter use (lm_head included)."""

    def __init__(self, lm: nn.Module, attention: str, chunk: int):
        super().__init__()
        self.lm, self.attention, self.chunk = lm, attention, chunk

    def forward(self, input_ids, labels, cu_seqlens):
        h = self.lm(input_ids, cu_seqlens=cu_seqlens, attention=self.attention, return_hidden=True)
        return chunked_cross_entropy(self.lm, h, labels, self.chunk)


def tokenizer_dir(cfg: RunConfig) -> Path:
    """data.tokenizer, else the model checkpoint's own tokenizer, else the packaged MiniCPM4 one."""
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer)
    ck = cfg.model.checkpoint
    if ck and any((Path(ck) / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
        return Path(ck)
    return asset_dir("minicpm4-0.5b")


class Trainer:
    """One run of a RunConfig on this process's rank. `train()` runs to run.steps; `step_on(rows)` is one
    optimizer step on given rows (throughput measurement)."""

    def __init__(self, cfg: RunConfig, info: D.DistInfo | None = None):
        self.cfg, r = cfg, cfg.run
        self.info = info or D.init_distributed(r.device)
        self.device = self.info.device
        self.out = Path(r.out_dir)
        self.tokenizer = load_tokenizer(tokenizer_dir(cfg))
        resume = latest_checkpoint(self.out) if r.resume else None
        self.resumed_from = resume
        state_dir = resume or (Path(r.branch_from) if r.branch_from else None)
        state = read_state(state_dir) if state_dir else None

        self.lm = self._build_model(resume, Path(r.branch_from) if r.branch_from and not resume else None)
        self.config = self.lm.config
        self.lm.requires_grad_(True).train()
        self.lm.model.gradient_checkpointing = r.activation_checkpointing
        self.loss_module = LossModule(self.lm, cfg.model.attention, r.loss_chunk)
        self.module = D.wrap(self.loss_module, self.info, r.parallel, self.lm.model.layers)
        self.fsdp = D.is_fsdp(self.module)
        o = cfg.optim
        groups = mup_param_groups(self.lm, o.lr, o.weight_decay, config=self.config, mup=cfg.model.mup_lr)
        self.opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        self.schedule = cfg.wsd()
        self.sched = wsd_scheduler(self.opt, self.schedule)
        self.packer = Packer(self._mix(cfg.run.seed), cfg.data.seq_len, cfg.data.pack)
        self.global_rows = cfg.data.micro_batch * cfg.data.grad_accum * self.info.world
        self.step = 0
        self._saved_step = -1
        if state is not None:
            self._restore(state, exact=resume is not None)
        self._eval_rows: list[Row] | None = None
        if self.info.device.type == "cuda":
            self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if r.dtype in ("auto", "bfloat16") else None
        else:
            self.autocast = torch.autocast("cpu", dtype=torch.bfloat16) if r.dtype == "bfloat16" else None
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        self.peak = peak_flops(name, r.peak_tflops) if self.device.type == "cuda" or r.peak_tflops else None

    # ------------------------------------------------------------------------------------------ setup
    def _sparse_override(self) -> SparseConfig | None | str:
        sc = self.cfg.model.sparse_config
        if sc is _UNSET:
            return "config"
        return SparseConfig.from_dict(None if sc is False else sc, source=f"{self.cfg.source}: model.sparse_config")

    def _build_model(self, resume: Path | None, branch: Path | None):
        m, dev = self.cfg.model, self.device
        if resume is not None:  # the saved config already carries any sparse override
            return load_model(resume, dev, torch.float32)
        if branch is not None or m.checkpoint:
            return load_model(branch or m.checkpoint, dev, torch.float32, sparse_config=self._sparse_override())
        config = resolve_config(m.init, m.overrides)
        sc = self._sparse_override()
        if sc != "config":
            config = config.with_sparse(sc)
        lm = build_model(config, dev)
        seed = m.init_seed if m.init_seed is not None else self.cfg.run.seed
        mup_init_(lm, seed, config=config, scale_hidden=m.mup_init)
        return lm

    def _mix(self, seed: int) -> DataMix:
        sources = []
        for i, s in enumerate(self.cfg.data.sources):
            sseed = s.seed if s.seed is not None else seed + i
            try:
                if s.type == "shards":
                    sources.append(ShardSource(s.path, seed=sseed))
                else:
                    sources.append(SyntheticSource(self.tokenizer, tasks=s.tasks, weights=s.task_weights,
                                                   min_len=s.min_len, max_len=s.max_len, seed=sseed, loss=s.loss,
                                                   prompt_labels=s.prompt_labels, workers=s.workers))
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"{self.cfg.source}: [data.sources[{i}]]: {e}") from None
        return DataMix(sources, [s.weight for s in self.cfg.data.sources], seed=seed)

    def _apply_hparams(self) -> None:
        """Config hyper-parameters over whatever a loaded optimizer state carried (lets a resume or a decay branch
        change lr, betas or weight decay; values are recomputed exactly as at construction)."""
        o = self.cfg.optim
        for g in self.opt.param_groups:
            g["initial_lr"] = o.lr * g["lr_scale"]
            g["betas"], g["eps"] = tuple(o.betas), o.eps
            g["weight_decay"] = o.weight_decay if g["name"] == "hidden" else 0.0
        self.sched.base_lrs = [g["initial_lr"] for g in self.opt.param_groups]

    def _restore(self, state: dict, exact: bool) -> None:
        if state["optim_format"] != ("fsdp_full" if self.fsdp else "torch"):
            raise ConfigError(f"{self.cfg.source}: the checkpoint's optimizer state ({state['optim_format']}) does "
                              f"not match run.parallel = {self.cfg.run.parallel!r}")
        if self.fsdp:
            D.load_full_optimizer_state(self.module, self.opt, state["optimizer"])
        else:
            self.opt.load_state_dict(state["optimizer"])
        self._apply_hparams()
        self.step = int(state["step"])
        self._saved_step = self.step if exact else -1
        set_scheduler_step(self.sched, self.step)
        data = state["data"]
        if exact or (data["seq_len"] == self.cfg.data.seq_len and len(data["counts"]) == len(self.packer.counts)):
            self.packer.load_state_dict(data)
        if exact:
            set_rng_state(state["rng"])

    # ------------------------------------------------------------------------------------------ steps
    def step_on(self, rows: list[Row]) -> dict:
        """One optimizer step on the global batch `rows` (this rank uses its slice). Returns step metrics."""
        info, accum, micro = self.info, self.cfg.data.grad_accum, self.cfg.data.micro_batch
        mine = rank_slice(rows, info.rank, info.world)
        n_global = sum(int((r.labels != IGNORE).sum()) for r in rows)
        scale = info.world / max(n_global, 1)
        loss_sum = torch.zeros((), device=self.device)
        attention = self.loss_module.attention = self.step_attention(self.step)
        for a in range(accum):
            ids, labels, cu = collate(mine[a * micro: (a + 1) * micro], self.device)
            with D.no_sync(self.module, a < accum - 1):
                with self.autocast or nullcontext():
                    ls = self.module(ids, labels, cu)
                (ls * scale).backward()
            loss_sum += ls.detach().float()
        D.all_reduce_sum(loss_sum)
        clip = self.cfg.optim.clip if self.cfg.optim.clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
        if hasattr(gnorm, "full_tensor"):
            gnorm = gnorm.full_tensor()
        lr = self.cfg.optim.lr * self.schedule(self.step)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        docs = [int(b - a) for r in rows for a, b in zip(r.cu_seqlens[:-1], r.cu_seqlens[1:])]
        return {"step": self.step, "loss": float(loss_sum) / max(n_global, 1), "lr": lr, "grad_norm": float(gnorm),
                "tokens": len(rows) * self.cfg.data.seq_len, "flops": step_flops(self.config, docs, attention),
                "dense": attention == "dense"}

    def step_attention(self, step: int) -> str:
        """model.attention, or "dense" for the model.dense_fraction share of steps (a coin seeded by run.seed and
        the step, the same on every rank and after a resume): one set of weights trained for both modes."""
        m = self.cfg.model
        if m.dense_fraction > 0 and m.attention != "dense":
            if random.Random(self.cfg.run.seed * 1_000_003 + step).random() < m.dense_fraction:
                return "dense"
        return m.attention

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over a fixed probe set: run.eval_rows rows of the training mix read with seed + 1
        (a different draw of the same sources, not a held-out split)."""
        if self._eval_rows is None:
            n = -(-self.cfg.run.eval_rows // self.info.world) * self.info.world
            self._eval_rows = Packer(self._mix(self.cfg.run.seed + 1), self.cfg.data.seq_len, self.cfg.data.pack).rows(n)
        rows = self._eval_rows
        mine = rank_slice(rows, self.info.rank, self.info.world)
        total = torch.zeros((), device=self.device)
        self.loss_module.attention = self.cfg.model.attention
        self.module.eval()
        for r in mine:
            ids, labels, cu = collate([r], self.device)
            with self.autocast or nullcontext():
                total += self.module(ids, labels, cu).float()
        self.module.train()
        D.all_reduce_sum(total)
        return float(total) / max(sum(int((r.labels != IGNORE).sum()) for r in rows), 1)

    # ------------------------------------------------------------------------------------------ saving
    def _model_writer(self):
        """A function writing the HF folder (rank 0), built collectively under FSDP."""
        if not self.fsdp:
            lm = self.lm
        else:
            full = D.full_model_state(self.module)
            if not self.info.main:
                return None
            lm = build_model(self.config, "meta")
            lm.load_state_dict({k.removeprefix("lm."): v for k, v in full.items()}, assign=True)
            if self.config.tie_word_embeddings:
                lm.lm_head.weight = lm.model.embed_tokens.weight

        def write(path: Path) -> None:
            save_model(lm, path)
            self.tokenizer.save(path)
        return write

    def save(self) -> Path | None:
        writer = self._model_writer()
        if self.fsdp:
            optim, fmt = D.full_optimizer_state(self.module, self.opt), "fsdp_full"
        else:
            optim, fmt = self.opt.state_dict(), "torch"
        path = None
        if self.info.main:
            state = {"step": self.step, "optimizer": optim, "optim_format": fmt, "data": self.packer.state_dict(),
                     "scheduler": {"last_epoch": self.sched.last_epoch, "wsd": self.schedule.to_dict()},
                     "rng": rng_state(), "world": self.info.world}
            path = save_checkpoint(self.out, self.step, writer, state, keep=self.cfg.run.keep_checkpoints)
        self._saved_step = self.step
        D.barrier()
        return path

    def save_final(self) -> Path | None:
        from .checkpointing import atomic_dir
        writer = self._model_writer()
        path = atomic_dir(self.out / "final", writer) if self.info.main else None
        D.barrier()
        return path

    # ------------------------------------------------------------------------------------------ loop
    def train(self, stop_at: int | None = None) -> dict:
        """Run to run.steps, save a last checkpoint and <out_dir>/final. stop_at: leave after that step without
        the final saves, as an interrupted run would (tests, and splitting a run over job slots)."""
        cfg, r, info = self.cfg, self.cfg.run, self.info
        if info.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "run_config.json").write_text(json.dumps(cfg.raw, indent=2, default=str) + "\n")
        log = MetricsLog(self.out / "metrics.jsonl", self.step, enabled=info.main)
        from tqdm.auto import tqdm
        bar = tqdm(total=r.steps, initial=self.step, disable=not (r.progress and info.main), desc="train",
                   unit="step", dynamic_ncols=True)
        last: dict = {}
        t_log, tok_log, flops_log, losses = time.perf_counter(), 0, 0.0, []
        while self.step < r.steps:
            rec = self.step_on(self.packer.rows(self.global_rows))
            tok_log += rec["tokens"]
            flops_log += rec["flops"]
            losses.append(rec["loss"])
            if self.step % r.log_every == 0 or self.step == r.steps:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t_log
                rec = {k: v for k, v in rec.items() if k not in ("tokens", "flops")}
                rec["loss_mean"] = sum(losses) / len(losses)  # over the steps since the last record
                rec["tokens_per_s"] = tok_log / dt
                if self.peak:
                    rec["mfu"] = flops_log / dt / (self.peak * info.world)
                rec["tokens_seen"] = self.step * self.global_rows * cfg.data.seq_len
                log.write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
                last = rec
                t_log, tok_log, flops_log, losses = time.perf_counter(), 0, 0.0, []
            bar.update(1)
            if r.eval_every and self.step % r.eval_every == 0:
                last = {**last, "eval_loss": self.evaluate()}
                log.write({"step": self.step, "eval_loss": last["eval_loss"]})
            if r.save_every and self.step % r.save_every == 0:
                self.save()
            if stop_at is not None and self.step >= stop_at:
                bar.close()
                return {**last, "step": self.step, "final": None}
        bar.close()
        if self._saved_step != self.step:
            self.save()
        final = self.save_final()
        return {**last, "step": self.step, "final": str(final) if final else None}


def measure_throughput(cfg: RunConfig | str | Path, *, steps: int = 5, warmup: int = 2, overrides: dict | None = None,
                       info: D.DistInfo | None = None) -> dict:
    """Tokens/s (and MFU on a known GPU) of full training steps on random single-document rows of data.seq_len,
    for a run file or RunConfig; nothing is written to disk. The model, optimizer, dtype, parallelism, attention
    mode and activation checkpointing are the run's."""
    if not isinstance(cfg, RunConfig):
        cfg = load_run_config(cfg, overrides)
    cfg = replace(cfg, run=replace(cfg.run, resume=False, branch_from=None, progress=False))
    tr = Trainer(cfg, info)
    L, n = cfg.data.seq_len, tr.global_rows
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, tr.config.vocab_size, (L + 1,), generator=g).numpy()
        rows.append(Row(ids[:-1].copy(), ids[1:].copy(), torch.tensor([0, L], dtype=torch.int32).numpy()))
    times, flops = [], 0.0
    for i in range(warmup + steps):
        if tr.device.type == "cuda":
            torch.cuda.synchronize(tr.device)
            if i == warmup:
                torch.cuda.reset_peak_memory_stats(tr.device)
        t = time.perf_counter()
        rec = tr.step_on(rows)
        if tr.device.type == "cuda":
            torch.cuda.synchronize(tr.device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
            flops = rec["flops"]
    step_s = sorted(times)[len(times) // 2]
    out = {"seq_len": L, "rows": n, "step_s": step_s, "tokens_per_s": n * L / step_s, "flops_per_step": flops,
           "params": sum(p.numel() for p in tr.lm.parameters()), "attention": cfg.model.attention,
           "sparse": tr.config.sparse_config is not None, "world": tr.info.world}
    if tr.peak:
        out["mfu"] = flops / step_s / (tr.peak * tr.info.world)
    if tr.device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(tr.device) / 2**30
    return out


def main(run_toml: str | Path, overrides: dict | None = None) -> dict:
    """Train from a RUN.toml (under torchrun: every rank calls this). Returns the last logged metrics."""
    cfg = load_run_config(run_toml, overrides)
    info = D.init_distributed(cfg.run.device)
    try:
        torch.manual_seed(cfg.run.seed)
        return Trainer(cfg, info).train()
    finally:
        D.shutdown()
