"""AsyncLLM: the AsyncEngine of protocol.py over LLMEngine, for servers.

One background thread owns the engine: it applies queued adds and aborts between steps and runs steps while any
request is unfinished, so requests join and leave a running batch (continuous batching). Each request streams
StreamDeltas into its own asyncio queue, fed with loop.call_soon_threadsafe. Leaving a stream early (aclose,
task cancellation, client gone) aborts the request; `abort` returns once its pages are free.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from ..errors import RequestError
from .config import EngineConfig
from .llm_engine import LLMEngine
from .protocol import StreamDelta
from .sampling_params import SamplingParams

log = logging.getLogger("longcpm.engine")


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue, self.done = loop, asyncio.Queue(), False

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            self.done = True


class AsyncLLM:
    """AsyncLLM("path/or/hub-id", max_num_seqs=64); async for d in llm.generate(ids, params, "id"): ...

    Arguments as LLM (model, device, dtype, attention, sparse_config, max_model_len, tokenizer) plus the
    EngineConfig fields (max_num_seqs, max_num_batched_tokens, num_pages, kv_cache_tokens, gpu_memory_utilization,
    enable_prefix_caching, cuda_graphs, page_size, ...). model_name defaults to the model folder's name.
    """

    def __init__(self, model, device=None, dtype=None, attention: str = "auto", sparse_config="config",
                 max_model_len: int | None = None, *, tokenizer=None, model_name: str | None = None,
                 **engine_kw):
        from ..models.checkpoint import load_model, resolve_model_path
        from ..text import load_tokenizer
        from .llm import resolve_device

        path = resolve_model_path(model)
        dev = resolve_device(device)
        m = load_model(path, dev, dtype, sparse_config=sparse_config)
        tok = load_tokenizer(resolve_model_path(tokenizer) if tokenizer is not None else path)
        cfg = EngineConfig(max_model_len=max_model_len, attention=attention, **engine_kw)
        self._start(LLMEngine(m, tok, cfg), model_name or Path(str(model)).name)

    @classmethod
    def from_engine(cls, engine: LLMEngine, model_name: str = "model") -> AsyncLLM:
        """Serve an engine that already exists (tests, or sharing one loaded model)."""
        self = cls.__new__(cls)
        self._start(engine, model_name)
        return self

    def _start(self, engine: LLMEngine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self._cv = threading.Condition()
        self._cmds: list[tuple] = []
        self._streams: dict[str, _Stream] = {}
        self._closing = self._drain = False
        self._thread = threading.Thread(target=self._loop, name="longcpm-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the protocol
    def encode_prompt(self, prompt: str | list[int], *, chat: list[dict] | None = None) -> list[int]:
        """Token ids with exactly one leading BOS: chat renders the checkpoint's template (prompt is then ignored),
        a string is encoded, a list of ids is taken as given; BOS is prepended unless the ids already start with it."""
        tok = self.tokenizer
        if chat is not None:
            ids = tok.encode(tok.apply_chat_template(chat, add_generation_prompt=True), add_special_tokens=False)
        elif isinstance(prompt, str):
            ids = tok.encode(prompt, add_special_tokens=False)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            ids = list(prompt)
        else:
            raise RequestError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        bos = tok.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[StreamDelta]:
        """Validates now (RequestError), then streams; the request joins the engine on the first iteration."""
        if self._closing:
            raise RequestError("the engine is shutting down and accepts no new requests")
        if not isinstance(request_id, str) or not request_id:
            raise RequestError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use")
        ids = list(prompt_ids) if isinstance(prompt_ids, (list, tuple)) else prompt_ids
        self.engine.check(ids, params)
        return self._stream(ids, params, request_id)

    async def _stream(self, ids: list[int], params: SamplingParams, rid: str) -> AsyncIterator[StreamDelta]:
        if rid in self._streams:
            raise RequestError(f"request id {rid!r} is already in use")
        stream = _Stream(asyncio.get_running_loop())
        self._streams[rid] = stream
        self._submit(("add", rid, ids, params))
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    stream.done = True
                    return
        finally:
            if not stream.done:
                stream.done = True
                self._submit(("abort", rid, None))  # left early: free the sequence at once
            self._streams.pop(rid, None)

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its pages; returns once that happened. Its stream ends with an "abort" delta."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(("abort", request_id, fut))
        await asyncio.wrap_future(fut)

    async def shutdown(self, *, drain: bool = True) -> None:
        """Refuse new requests; drain=True lets running ones finish, drain=False aborts them. Idempotent."""
        with self._cv:
            self._closing, self._drain = True, drain
            self._cv.notify()
        await asyncio.to_thread(self._thread.join)

    # ------------------------------------------------------------------ the engine thread
    def _submit(self, cmd: tuple) -> None:
        with self._cv:
            if not self._thread.is_alive():
                self._apply(cmd)  # no engine thread any more: act directly
                return
            self._cmds.append(cmd)
            self._cv.notify()

    def _apply(self, cmd: tuple) -> None:
        kind, rid, arg = cmd[0], cmd[1], cmd[-1]
        if kind == "add":
            try:
                self.engine.add_request(rid, cmd[2], cmd[3])
            except Exception as e:  # validated already; a race (duplicate id) still must not kill the thread
                self._finish_stream(rid, e)
            return
        if self.engine.abort(rid):
            self._finish_stream(rid, StreamDelta(rid, "", [], True, "abort"))
        if arg is not None:
            arg.set_result(None)

    def _finish_stream(self, rid: str, item) -> None:
        s = self._streams.get(rid)
        if s is not None and not s.done:
            s.put(item)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._cmds and not self.engine.has_unfinished() and not self._closing:
                    self._cv.wait()
                cmds, self._cmds = self._cmds, []
                stop = self._closing and (not self._drain or (not cmds and not self.engine.has_unfinished()))
            for cmd in cmds:
                self._apply(cmd)
            if stop:
                for rid in list(self.engine.requests):
                    self._apply(("abort", rid, None))
                with self._cv:  # commands that raced with the stop are applied by _submit from now on
                    for cmd in self._cmds:
                        self._apply(cmd)
                    self._cmds = []
                return
            try:
                deltas = self.engine.step()
            except Exception as e:  # fail the requests of this step, keep serving the rest
                log.exception("engine step failed")
                for rid in list(self.engine.requests):
                    self.engine.abort(rid)
                    self._finish_stream(rid, RuntimeError(f"engine step failed: {type(e).__name__}: {e}"))
                continue
            for d in deltas:
                s = self._streams.get(d.request_id)
                if s is None or s.done:
                    continue
                s.put(d)
                if s.done:  # the loop went away while we were putting
                    self.engine.abort(d.request_id)

    def stats(self) -> dict:
        return self.engine.stats()
