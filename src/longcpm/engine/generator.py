"""The batched generation loop over a contiguous KV cache: one right-padded prefill, then one-token decode steps.

Rows of a batch finish independently (eos / stop ids, stop strings, max_tokens); a finished row stays in the
batch with new_lens 0, so the model neither reads nor writes its cache again. Text is detokenized incrementally
and held back just enough that a stop string is never streamed before it is recognised.
Knows the model's forward contract and the tokenizer, nothing of the CLI or a server.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import RequestError
from ..ops.sampling import sample
from ..text import Tokenizer
from .detokenizer import Detokenizer
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams

OnToken = Callable[[int, str, int], None]  # (request_index, new_text, token_id)


@dataclass
class Request:
    """A prompt ready to run: its token ids (already encoded) and how to decode it."""

    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class _Row:
    """Per-request decoding state inside one batch; text and stop conditions are the Detokenizer's."""

    index: int
    request: Request
    detok: Detokenizer
    rng: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return not self.detok.finished

    def accept(self, token_id: int) -> str:
        """Record one sampled token; return the text it releases (all of the rest once the row finishes)."""
        self.token_ids.append(token_id)
        return self.detok.accept(token_id)


class BatchGenerator:
    """Runs Requests through a MiniCPM4ForCausalLM in batches of at most max_num_seqs."""

    def __init__(self, model, tokenizer: Tokenizer, *, attention: str = "auto", max_model_len: int | None = None,
                 max_num_seqs: int = 32):
        if attention not in ("auto", "dense", "sparse"):
            raise RequestError(f"attention must be 'auto', 'dense' or 'sparse', got {attention!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.attention = attention
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        self.max_num_seqs = max(1, max_num_seqs)
        self.eos_ids = frozenset(model.config.eos_token_ids) | frozenset(tokenizer.eos_token_ids)

    def check(self, req: Request, where: str = "prompt") -> None:
        """Refuse what cannot be served before any compute is spent on it."""
        ids, vocab = req.prompt_token_ids, self.model.config.vocab_size
        if not ids:
            raise RequestError(f"{where}: empty prompt (no tokens)")
        bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab]
        if bad:
            raise RequestError(f"{where}: token ids must be integers in [0, {vocab}), got {bad[:5]}")
        need = len(ids) + req.params.max_tokens
        if need > self.max_model_len:
            raise RequestError(f"{where}: {len(ids)} prompt tokens + max_tokens {req.params.max_tokens} = {need} "
                               f"exceeds the maximum model length {self.max_model_len}")

    def run(self, requests: list[Request], *, on_token: OnToken | None = None, progress=None) -> list[RequestOutput]:
        for n, req in enumerate(requests):
            self.check(req, f"prompt {n}")
        outputs: list[RequestOutput] = []
        for start in range(0, len(requests), self.max_num_seqs):
            batch = requests[start: start + self.max_num_seqs]
            outputs += self._run_batch(batch, start, on_token, progress)
        return outputs

    def _new_row(self, index: int, req: Request) -> _Row:
        p = req.params
        rng = None
        if not p.greedy:
            # unseeded requests still get their own stream, seeded from torch's global RNG (torch.manual_seed)
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            rng = torch.Generator(device=self.model.device)
            rng.manual_seed(seed)
        return _Row(index, req, Detokenizer(self.tokenizer, p, self.eos_ids), rng)

    def _run_batch(self, batch: list[Request], offset: int, on_token: OnToken | None, progress) -> list[RequestOutput]:
        model, dev = self.model, self.model.device
        rows = [self._new_row(offset + i, r) for i, r in enumerate(batch)]
        lens = [len(r.prompt_token_ids) for r in batch]
        B, T = len(batch), max(lens)
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, : lens[b]] = torch.tensor(r.prompt_token_ids, dtype=torch.long)
        cache = model.new_cache(B, max(n + r.params.max_tokens for n, r in zip(lens, batch)))
        params = [r.params for r in batch]
        temp = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
        top_k = torch.tensor([max(p.top_k, 0) for p in params], dtype=torch.long, device=dev)
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev)

        def step(logits: torch.Tensor, active: list[int]) -> None:
            idx = torch.tensor(active, device=dev)
            toks = sample(logits[idx], temp[idx], top_p[idx], top_k[idx], min_p[idx],
                          [rows[b].rng for b in active]).tolist()
            for b, tok in zip(active, toks):
                delta = rows[b].accept(tok)
                if on_token is not None:
                    on_token(rows[b].index, delta, tok)
                if not rows[b].active and progress is not None:
                    progress.update(1)

        t0 = time.perf_counter()
        steps = 0
        with torch.inference_mode():
            logits = model(ids.to(dev), cache=cache, new_lens=lens, attention=self.attention, last_only=True)
            step(logits, list(range(B)))
            t1 = time.perf_counter()
            while active := [b for b in range(B) if rows[b].active]:
                last = torch.tensor([[rows[b].token_ids[-1] if rows[b].active else 0] for b in range(B)],
                                    dtype=torch.long, device=dev)
                new_lens = [1 if rows[b].active else 0 for b in range(B)]
                logits = model(last, cache=cache, new_lens=new_lens, attention=self.attention, last_only=True)
                step(logits, active)
                steps += 1
        metrics = RequestMetrics(prefill_s=t1 - t0, decode_s=time.perf_counter() - t1, batch_size=B,
                                 decode_steps=steps)
        return [RequestOutput(request_id=row.index, prompt=row.request.prompt,
                              prompt_token_ids=list(row.request.prompt_token_ids),
                              outputs=[CompletionOutput(0, row.detok.text, row.token_ids, row.detok.finish_reason,
                                                       row.detok.stop_reason)],
                              metrics=metrics)
                for row in rows]
