"""Per-request state (Job) and the OpenAI response shapes built from engine StreamDeltas: the non-streaming
body, the SSE chunk sequence, and the one log line per request.

Chunk order (spec serving §2.3): chat starts with a {"role": "assistant"} delta; one chunk per engine delta
that carries text; a last choice chunk with finish_reason; with include_usage a chunk with empty choices and
the usage; then `data: [DONE]`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from starlette.responses import JSONResponse

from ..engine.protocol import AsyncEngine, StreamDelta
from .schema import APIError, ParsedRequest
from .sse import DONE, event

log = logging.getLogger("longcpm.server")


async def next_delta(agen) -> StreamDelta | None:
    """The next delta, or None when the stream ended (StopAsyncIteration cannot cross a Task boundary)."""
    try:
        return await anext(agen)
    except StopAsyncIteration:
        return None


@dataclass
class Job:
    """One request from arrival to its log line: what it asked, what the engine sent back, how it ended."""

    rid: str
    chat: bool
    model: str
    req: ParsedRequest | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    t0: float = field(default_factory=time.perf_counter)
    ttft: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    pieces: list[str] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    status: int = 200
    error: str | None = None
    aborted: bool = False

    def on_delta(self, d: StreamDelta | None) -> None:
        if d is None:  # the engine ended the stream without a finished delta: report it as aborted
            self.finished, self.finish_reason = True, self.finish_reason or "abort"
            return
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.t0
        self.prompt_tokens = d.prompt_tokens or self.prompt_tokens
        self.completion_tokens = d.completion_tokens or self.completion_tokens + len(d.token_ids)
        if d.text:
            self.pieces.append(d.text)
        if d.finished:
            self.finished, self.finish_reason = True, d.finish_reason or "stop"

    def fail(self, err: APIError) -> JSONResponse:
        """Record the error for the log line and render it as the OpenAI error response."""
        self.status, self.error = err.status, err.message
        return JSONResponse(err.body(), status_code=err.status, headers={"x-request-id": self.rid})

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def echo_text(self) -> str:
        return self.req.prompt if self.req is not None and self.req.echo else ""

    def response(self) -> dict:
        text = self.echo_text() + "".join(self.pieces)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": self.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self.finish_reason}
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": self.usage}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, *, role: bool = False,
              usage: bool = False) -> bytes:
        obj = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model}
        if usage:
            obj["choices"], obj["usage"] = [], self.usage
            return event(obj)
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            obj["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        else:
            obj["choices"] = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
        if self.req is not None and self.req.include_usage:
            obj["usage"] = None  # OpenAI: every chunk but the last carries "usage": null
        return event(obj)

    def log(self) -> None:
        total = time.perf_counter() - self.t0
        kind = "chat" if self.chat else "completion"
        stream = self.req.stream if self.req is not None else "?"
        if self.error is not None:
            log.info("%s %s status=%d error=%r latency=%.3fs", self.rid, kind, self.status, self.error, total)
            return
        ttft = f"{self.ttft:.3f}s" if self.ttft is not None else "-"
        log.info("%s %s stream=%s status=%d prompt_tokens=%d completion_tokens=%d finish=%s ttft=%s latency=%.3fs",
                 self.rid, kind, stream, self.status, self.prompt_tokens, self.completion_tokens,
                 "abort" if self.aborted else self.finish_reason, ttft, total)


async def close_request(engine: AsyncEngine, job: Job, agen) -> None:
    """Free the engine sequence now if it did not finish (disconnect, error, shutdown), then close the stream."""
    if not job.finished:
        try:
            await engine.abort(job.rid)
        except Exception:
            log.exception("%s: abort failed", job.rid)
        job.aborted = True
    with contextlib.suppress(Exception):
        await agen.aclose()


async def stream_events(job: Job, first: StreamDelta, agen, engine: AsyncEngine) -> AsyncGenerator[bytes, None]:
    """SSE body of one request. Closing this generator early (disconnect, shutdown) aborts the engine request."""
    try:
        if job.chat:
            yield job.chunk(role=True)
        if job.echo_text():
            yield job.chunk(job.echo_text())
        delta: StreamDelta | None = first
        while True:
            if delta is not None and delta.text:
                yield job.chunk(delta.text)
            if job.finished:
                break
            delta = await next_delta(agen)
            job.on_delta(delta)
        yield job.chunk(finish_reason=job.finish_reason)
        if job.req is not None and job.req.include_usage:
            yield job.chunk(usage=True)
        yield DONE
    except Exception as e:  # an engine fault mid-stream: tell the client in-band, the status line is long gone
        log.exception("%s: stream failed", job.rid)
        job.status, job.error = 500, f"{type(e).__name__}: {e}"
        yield event({"error": {"message": f"Internal server error ({type(e).__name__}).", "type": "server_error",
                               "param": None, "code": None}})
        yield DONE
    finally:
        await close_request(engine, job, agen)
        job.log()
