"""LLMEngine: requests in, token/text increments out, one scheduler step at a time (synchronous; AsyncLLM drives
it from a thread). Owns the paged KV pool, the block manager, the scheduler and the model runner."""

from __future__ import annotations

import time

import torch

from ..errors import ConfigError, RequestError
from ..kvcache.paged import PagedKVPool
from ..text import Tokenizer
from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import Detokenizer
from .memory import plan_num_pages
from .model_runner import ModelRunner
from .protocol import StreamDelta
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence, Status


class LLMEngine:
    """engine = LLMEngine(model, tokenizer, EngineConfig(...)); engine.add_request("a", ids, params);
    while engine.has_unfinished(): for delta in engine.step(): ..."""

    def __init__(self, model, tokenizer: Tokenizer, config: EngineConfig | None = None, **overrides):
        cfg = config or EngineConfig(**overrides)
        if config is not None and overrides:
            raise ConfigError("pass an EngineConfig or keyword overrides, not both")
        limit = model.config.max_position_embeddings
        if cfg.max_model_len is not None and cfg.max_model_len > limit:
            raise ConfigError(f"max_model_len must be in [1, {limit}] (max_position_embeddings), got "
                              f"{cfg.max_model_len}")
        self.config, self.model, self.tokenizer = cfg, model, tokenizer
        self.max_model_len = cfg.max_model_len or limit
        rope = model.model.rotary_emb
        if rope.factors_differ and self.max_model_len > rope.orig_max:
            raise ConfigError(f"this checkpoint's LongRoPE long and short factors differ, which the engine supports "
                              f"only up to original_max_position_embeddings: set max_model_len <= {rope.orig_max}")
        self.eos_ids = frozenset(model.config.eos_token_ids) | frozenset(tokenizer.eos_token_ids)
        num_pages = plan_num_pages(model, cfg, self.max_model_len)
        self.pool = PagedKVPool(model.config, num_pages, cfg.page_size, model.device, model.dtype)
        self.blocks = BlockManager(num_pages, cfg.page_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.runner = ModelRunner(model, self.pool, cfg, self.max_model_len)
        self.requests: dict[str, Sequence] = {}
        self.num_steps = 0

    @property
    def max_num_seqs(self) -> int:
        return self.scheduler.max_num_seqs

    @max_num_seqs.setter
    def max_num_seqs(self, n: int) -> None:
        self.scheduler.max_num_seqs = max(1, min(n, self.config.max_num_seqs))

    def check(self, prompt_ids: list[int], params: SamplingParams, where: str = "prompt") -> None:
        """Refuse what can never be served, before any compute is spent on it."""
        vocab = self.model.config.vocab_size
        if not isinstance(params, SamplingParams):
            raise RequestError(f"{where}: params must be a SamplingParams, got {type(params).__name__}")
        if not prompt_ids:
            raise RequestError(f"{where}: empty prompt (no tokens)")
        bad = [i for i in prompt_ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab]
        if bad:
            raise RequestError(f"{where}: token ids must be integers in [0, {vocab}), got {bad[:5]}")
        need = len(prompt_ids) + params.max_tokens
        if need > self.max_model_len:
            raise RequestError(f"{where}: {len(prompt_ids)} prompt tokens + max_tokens {params.max_tokens} = {need} "
                               f"exceeds the maximum model length {self.max_model_len}")
        if need - 1 > self.blocks.capacity_tokens:
            raise RequestError(f"{where}: {len(prompt_ids)} prompt tokens + max_tokens {params.max_tokens} = {need} "
                               f"can never fit the KV cache ({self.blocks.capacity_tokens} tokens)")

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> Sequence:
        """Queue a request (validated first: RequestError). It runs from the next step on."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already running")
        ids = list(prompt_ids)
        self.check(ids, params)
        rng = None
        if not params.greedy:
            # unseeded requests still get their own stream, seeded from torch's global RNG (torch.manual_seed)
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            rng = torch.Generator(device=self.model.device)
            rng.manual_seed(seed)
        seq = Sequence(request_id, ids, params, Detokenizer(self.tokenizer, params, self.eos_ids), rng, prompt,
                       arrival=time.perf_counter())
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its pages now. False if it is unknown or already finished."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq)
        seq.detok.finish("abort")
        return True

    def step(self) -> list[StreamDelta]:
        """Schedule and run one step; one delta per sampled token (the last one of a request has finished=True)."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.scheduler.has_work():  # admission guarantees progress; a stall is a bug, not a wait
                raise RuntimeError(f"the scheduler found nothing to run with work pending: {self.stats()}")
            return []
        sampled = self.runner.execute(batch)
        self.num_steps += 1
        for seq, n in zip(batch.seqs, batch.num_new):
            seq.num_computed += n
            self.blocks.register(seq)
        out = []
        now = time.perf_counter()
        for seq, tok in sampled:
            seq.token_ids.append(tok)
            if seq.first_token_time is None:
                seq.first_token_time = now
            text = seq.detok.accept(tok)
            done = seq.detok.finished
            if done:
                self.scheduler.finish(seq)
                self.requests.pop(seq.request_id, None)
            out.append(StreamDelta(seq.request_id, text, [tok], done, seq.detok.finish_reason if done else None,
                                   seq.num_prompt_tokens, seq.detok.num_tokens))
        return out

    def stats(self) -> dict:
        s = self.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting), "free_pages": self.blocks.num_free,
                "num_pages": self.blocks.num_pages - 1, "page_size": self.blocks.page_size,
                "preemptions": s.num_preemptions, "prefix_reused_tokens": self.blocks.reused_tokens,
                "steps": self.num_steps}

    def is_running(self, request_id: str) -> bool:
        seq = self.requests.get(request_id)
        return seq is not None and seq.status is Status.RUNNING
