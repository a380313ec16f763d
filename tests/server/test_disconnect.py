"""Clients that go away, concurrency without a lock, and graceful shutdown, over a scripted engine with a
per-token delay (so timing is controlled): the engine request must be aborted at once, the server must keep
serving, and SIGTERM-style shutdown must let in-flight streams finish or cancel them cleanly."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from .fakes import ScriptedEngine  # noqa: E402

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def wait_for(cond, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def assert_still_serving(url: str) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 3}, timeout=10)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_stream_disconnect_aborts_at_once(serve):
    engine = ScriptedEngine(delay=0.02)
    srv = serve(engine)
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        with c.stream("POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 200, "stream": True}) as r:
            rid = r.headers["x-request-id"]
            lines = r.iter_lines()
            got = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
            assert len(got) == 3
            t0 = time.monotonic()
        # leaving the block closes the connection mid-stream
        assert wait_for(lambda: rid in engine.aborted and rid not in engine.active)
        assert time.monotonic() - t0 < 1.0, "abort must follow the disconnect at once, not at stream end"
    assert engine.aborted == [rid]
    assert_still_serving(srv.url)


@pytest.mark.parametrize("delay", [1.0, 0.02], ids=["before-first-token", "mid-generation"])
def test_nonstream_disconnect_aborts(serve, delay):
    engine = ScriptedEngine(delay=delay)
    srv = serve(engine)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 200}, timeout=0.3)
    assert wait_for(lambda: len(engine.aborted) == 1 and not engine.active)
    assert engine.aborted == engine.started[:1]
    engine.delay = 0
    assert_still_serving(srv.url)


def test_requests_run_concurrently(serve):
    """16 streams of 20 tokens at 50 ms/token take ~1 s together, not 16 s: no lock serialises requests."""
    engine = ScriptedEngine(delay=0.05)
    srv = serve(engine)

    async def one(c):
        r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 20, "stream": True})
        return r.text

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, timeout=30,
                                     limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*(one(c) for _ in range(16)))

    t0 = time.monotonic()
    bodies = asyncio.run(main())
    wall = time.monotonic() - t0
    assert all(b.endswith("data: [DONE]\n\n") for b in bodies) and len(set(bodies)) > 1  # ids differ
    assert engine.max_active == 16 and wall < 4.0, (engine.max_active, wall)


def _read_stream(url: str, out: dict, max_tokens: int) -> None:
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "x", "max_tokens": max_tokens,
                                                                 "stream": True}, timeout=30) as r:
            out["rid"] = r.headers["x-request-id"]
            for line in r.iter_lines():
                out.setdefault("lines", []).append(line)
    except httpx.HTTPError as e:
        out["error"] = e


def test_shutdown_drains_in_flight_stream(serve):
    engine = ScriptedEngine(delay=0.02)
    srv = serve(engine)
    out: dict = {}
    t = threading.Thread(target=_read_stream, args=(srv.url, out, 40))
    t.start()
    assert wait_for(lambda: len(out.get("lines", [])) >= 2)
    srv.stop()  # what SIGTERM does: stop accepting, let the stream finish, then shut the engine down
    t.join(10)
    assert out["lines"][-2:] == ["data: [DONE]", ""] and "error" not in out
    assert engine.aborted == [] and engine.shutdown_calls == [True]


def test_shutdown_timeout_cancels_and_aborts(serve):
    engine = ScriptedEngine(delay=0.02, max_model_len=10000)
    srv = serve(engine, graceful_timeout=0.3)
    out: dict = {}
    t = threading.Thread(target=_read_stream, args=(srv.url, out, 5000))
    t.start()
    assert wait_for(lambda: len(out.get("lines", [])) >= 2)
    t0 = time.monotonic()
    srv.stop()
    t.join(10)
    assert time.monotonic() - t0 < 5
    assert engine.aborted == [out["rid"]] and not engine.active and engine.shutdown_calls == [True]


def test_disconnect_frees_real_engine_sequence(real_server, monkeypatch):
    """End to end over the real engine: the vanished client's sequence leaves the engine at once."""
    engine, calls = real_server.engine, []
    orig = engine.abort

    async def spy(rid):
        calls.append(rid)
        await orig(rid)

    monkeypatch.setattr(engine, "abort", spy)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 480, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{real_server.url}/v1/completions", json=body, timeout=30) as r:
        rid = r.headers["x-request-id"]
        got = [line for line, _ in zip(r.iter_lines(), range(6)) if line.startswith("data: ")]
        assert len(got) == 3
    assert wait_for(lambda: calls == [rid], timeout=2)
    inner = getattr(engine, "engine", None)
    if hasattr(inner, "requests"):  # AsyncLLM: the LLMEngine no longer holds the sequence
        assert wait_for(lambda: rid not in inner.requests and not inner.has_unfinished(), timeout=2)
    r = httpx.post(f"{real_server.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
