"""A fake engine implementing the AsyncEngine protocol for server tests (end-to-end tests use the real AsyncLLM).

ScriptedEngine: the real tokenizer, but a deterministic token script instead of a model, with a per-token delay
and a record of aborts, so the HTTP layer (SSE shape, disconnects, concurrency) is tested exactly and fast.
"""

from __future__ import annotations

import asyncio

from longcpm.assets import asset_dir
from longcpm.engine.protocol import StreamDelta
from longcpm.engine.sampling_params import SamplingParams
from longcpm.errors import RequestError
from longcpm.text import StreamDecoder, load_tokenizer

SCRIPT = " The quick brown fox jumps over the lazy dog, and then it naps in the sun."


def encode_bos_once(tokenizer, prompt, chat=None) -> list[int]:
    """Spec serving §3: chat template / text without BOS, then exactly one BOS in front."""
    if chat is not None:
        ids = tokenizer.encode(tokenizer.apply_chat_template(chat, add_generation_prompt=True), add_special_tokens=False)
    elif isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
    else:
        ids = list(prompt)
    bos = tokenizer.bos_token_id
    return ids if ids[:1] == [bos] else [bos] + ids


class ScriptedEngine:
    def __init__(self, *, max_model_len: int = 256, delay: float = 0.0, eos_after: int | None = None,
                 model_name: str = "scripted"):
        self.tokenizer = load_tokenizer(asset_dir("minicpm4-0.5b"))
        self.model_name, self.max_model_len = model_name, max_model_len
        self.delay, self.eos_after = delay, eos_after
        self.script = self.tokenizer.encode(SCRIPT, add_special_tokens=False)
        self.aborted: list[str] = []
        self.active: set[str] = set()
        self.started: list[str] = []
        self.max_active = 0
        self.shutdown_calls: list[bool] = []
        self._abort_flags: dict[str, asyncio.Event] = {}

    def encode_prompt(self, prompt, *, chat=None) -> list[int]:
        return encode_bos_once(self.tokenizer, prompt, chat)

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str):
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise RequestError(f"prompt + max_tokens exceeds {self.max_model_len}")
        if not all(0 <= i < self.tokenizer.vocab_size for i in prompt_ids):
            raise RequestError("prompt: token ids outside the vocabulary")
        self.last_params = params
        return self._run(list(prompt_ids), params, request_id)

    async def _run(self, prompt_ids, params, rid):
        self.started.append(rid)
        self.active.add(rid)
        self.max_active = max(self.max_active, len(self.active))
        flag = self._abort_flags.setdefault(rid, asyncio.Event())
        dec, text, n = StreamDecoder(self.tokenizer), "", 0
        try:
            while True:
                if self.delay:
                    await asyncio.sleep(self.delay)
                if flag.is_set():
                    yield StreamDelta(rid, "", [], True, "abort", len(prompt_ids), n)
                    return
                n += 1
                if self.eos_after is not None and n > self.eos_after and not params.ignore_eos:
                    yield StreamDelta(rid, dec.flush(), [2], True, "stop", len(prompt_ids), n)
                    return
                tok = self.script[(n - 1 + len(prompt_ids)) % len(self.script)]
                piece = dec.push(tok)
                reason = "length" if n >= params.max_tokens else None
                hit = [i for s in params.stop if (i := (text + piece).find(s)) >= 0]
                if hit:
                    piece, reason = (text + piece)[: min(hit)][len(text):], "stop"
                elif reason:
                    piece += dec.flush()
                text += piece
                yield StreamDelta(rid, piece, [tok], reason is not None, reason, len(prompt_ids), n)
                if reason:
                    return
        finally:
            self.active.discard(rid)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self._abort_flags.setdefault(request_id, asyncio.Event()).set()

    async def shutdown(self, *, drain: bool = True) -> None:
        self.shutdown_calls.append(drain)
