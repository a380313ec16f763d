"""Server-sent events: the byte-exact `data: {json}\\n\\n` ... `data: [DONE]\\n\\n` stream, and a response that
stops its producer the moment the client goes away.

Starlette's StreamingResponse notices a disconnect only when the next write fails (ASGI spec 2.4) or through
its own listener (older specs), and may leave the body generator to the garbage collector. A vanished client
must free its engine sequence at once, so this response races the producer against `http.disconnect` itself
and always closes the event generator (whose `finally` aborts the engine request).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger("longcpm.server")

DONE = b"data: [DONE]\n\n"


def event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def wait_disconnect(receive: Receive) -> None:
    """Return once the client has disconnected (the request body must already have been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    """The client disconnected before the response started."""


async def until_disconnect(receive: Receive, coro):
    """Await coro, but cancel it and raise ClientGone if the client disconnects first."""
    work = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
    if work.cancelled():
        raise ClientGone
    return work.result()


class EventStream(Response):
    """200 text/event-stream whose body comes from `events`; closed (never leaked) on disconnect or shutdown."""

    def __init__(self, events: AsyncGenerator[bytes, None], headers: dict[str, str] | None = None):
        # no Response.__init__: it would add content-length: 0 for the empty body
        self.status_code, self.background, self.events = 200, None, events
        hdrs = {"content-type": "text/event-stream", "cache-control": "no-cache", "x-accel-buffering": "no",
                **(headers or {})}
        self.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in hdrs.items()]

    async def _produce(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        producer = asyncio.ensure_future(self._produce(send))
        listener = asyncio.ensure_future(wait_disconnect(receive))
        try:
            await asyncio.wait({producer, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also on cancellation (shutdown timeout): stop producing, then close the generator
            for task in (producer, listener):
                task.cancel()
            results = await asyncio.gather(producer, listener, return_exceptions=True)
            await self.events.aclose()
        err = results[0]
        if isinstance(err, BaseException) and not isinstance(err, (asyncio.CancelledError, OSError)):
            log.error("event stream failed", exc_info=err)
