"""Raw HTTP against the app over a scripted engine: exact SSE bytes, response shapes, every malformed request
answered 4xx with an OpenAI error body (and the server keeps serving), the API key, request-id log lines."""

from __future__ import annotations

import json
import logging

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from .fakes import ScriptedEngine  # noqa: E402

CHAT = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}


@pytest.fixture(scope="module")
def client():
    from longcpm.server.app import create_app

    from .conftest import ServerThread

    engine = ScriptedEngine(max_model_len=256, eos_after=12)
    srv = ServerThread(create_app(engine)).start()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        c.engine = engine
        yield c
    srv.stop()


def events(body: str) -> list:
    """Split an SSE body, asserting the exact framing: every event is `data: ...` followed by a blank line."""
    assert body.endswith("data: [DONE]\n\n")
    parts = body.split("\n\n")
    assert parts[-1] == ""
    assert all(p.startswith("data: ") and "\n" not in p for p in parts[:-1])
    return [p[6:] if p == "data: [DONE]" else json.loads(p[6:]) for p in parts[:-1]]


def test_health_and_models(client):
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["scripted"]
    assert set(models["data"][0]) >= {"id", "object", "created", "owned_by"}
    assert client.get("/v1/models/scripted").json()["id"] == "scripted"
    assert client.get("/v1/models/other").status_code == 404


def test_chat_nonstream_shape(client):
    r = client.post("/v1/chat/completions", json=CHAT)
    body = r.json()
    assert r.status_code == 200 and body["id"].startswith("chatcmpl-") and r.headers["x-request-id"] == body["id"]
    assert body["object"] == "chat.completion" and body["model"] == "scripted"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    u = body["usage"]
    assert u["completion_tokens"] == 6 and u["prompt_tokens"] > 1 and u["total_tokens"] == u["prompt_tokens"] + 6


def test_chat_stream_exact_format(client):
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    ev = events(r.text)
    assert ev[-1] == "[DONE]"
    chunks, usage = ev[:-2], ev[-2]
    assert {c["id"] for c in ev[:-1]} == {r.headers["x-request-id"]} and len({c["created"] for c in ev[:-1]}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in ev[:-1])
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert all(c["usage"] is None for c in chunks)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]["content"]


def test_completion_stream_and_stop(client):
    base = {"prompt": "Say", "max_tokens": 10}
    full = client.post("/v1/completions", json=base).json()
    assert full["object"] == "text_completion" and full["id"].startswith("cmpl-")
    ev = events(client.post("/v1/completions", json={**base, "stream": True}).text)
    assert all(c["object"] == "text_completion" and "usage" not in c for c in ev[:-1])
    assert "".join(c["choices"][0]["text"] for c in ev[:-1]) == full["choices"][0]["text"]
    text = full["choices"][0]["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = client.post("/v1/completions", json={**base, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.index(stop)]
    echo = client.post("/v1/completions", json={**base, "echo": True}).json()["choices"][0]["text"]
    assert echo == "Say" + text
    ids = client.post("/v1/completions", json={**base, "prompt": [1, 15934]}).json()
    assert ids["usage"]["prompt_tokens"] == 2
    eos = client.post("/v1/completions", json={**base, "max_tokens": 40}).json()["choices"][0]
    assert eos["finish_reason"] == "stop"  # the scripted engine emits eos after 12 tokens


def test_defaults_and_bos(client, serve):
    """Omitted sampling fields take generation_config defaults; BOS appears exactly once, also after '<s>'."""
    client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    p = client.engine.last_params
    assert (p.temperature, p.top_p, p.max_tokens) == (0.8, 0.8, 2)
    client.post("/v1/completions", json={"prompt": "x", "temperature": 0, "top_p": 0.5, "top_k": 3, "seed": 7,
                                         "ignore_eos": True, "stop": "zz"})
    p = client.engine.last_params
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.ignore_eos, p.stop, p.max_tokens) == (0, 0.5, 3, 7, True,
                                                                                             ["zz"], 16)
    client.post("/v1/chat/completions", json={"messages": CHAT["messages"]})
    assert client.engine.last_params.max_tokens == 256 - len(client.engine.encode_prompt("", chat=CHAT["messages"]))
    greedy = serve(client.engine, generation_config={"do_sample": False})
    httpx.post(f"{greedy.url}/v1/completions", json={"prompt": "x"})
    assert client.engine.last_params.temperature == 0
    with_bos = client.post("/v1/completions", json={"prompt": "<s>hi", "max_tokens": 2}).json()
    assert with_bos["usage"]["prompt_tokens"] == len(client.engine.encode_prompt("hi")) == 2
    assert client.engine.encode_prompt("", chat=CHAT["messages"])[:2] == [1, 73441]


BAD = [  # (path, body or raw text, status, param)
    ("/v1/completions", "{not json", 400, None),
    ("/v1/completions", "[1, 2]", 400, None),
    ("/v1/completions", "[" * 100000, 400, None),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, True]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, -3]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "word " * 400, "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -5}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "seed": "abc"}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": 7}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["a"] * 17}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "top_k": 2**40}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "temperature": float("nan")}, 400, "temperature"),
    ("/v1/completions", {"prompt": [2**40]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "model": 3}, 400, "model"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": [1, 999999]}, 400, None),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": ["hi"]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]"),
    ("/v1/chat/completions", {**CHAT, "n": 3}, 400, "n"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {**CHAT, "stream_options": 1}, 400, "stream_options"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[0][4:]}" for i, b in enumerate(BAD)])
def test_malformed(client, path, body, status, param):
    raw = body if isinstance(body, str) else json.dumps(body)
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert client.engine.active == set()
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # still serving


def test_transport_errors(client, serve):
    r = client.post("/v1/chat/completions", content=json.dumps(CHAT), headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert client.get("/v1/chat/completions").status_code == 405
    assert client.get("/v2/nothing").json()["error"]["message"]
    small = serve(ScriptedEngine(), max_body_bytes=1000)
    r = httpx.post(f"{small.url}/v1/completions", json={"prompt": "x" * 5000})
    assert r.status_code == 413 and "error" in r.json()


def test_api_key(serve):
    srv = serve(ScriptedEngine(), api_key="s3cret")
    with httpx.Client(base_url=srv.url) as c:
        assert c.get("/health").status_code == 200
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            r = c.post("/v1/chat/completions", json=CHAT, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert c.get("/v1/models", headers=headers).status_code == 401
        assert c.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer s3cret"}).status_code == 200


def test_request_log_line(client, caplog):
    with caplog.at_level(logging.INFO, logger="longcpm.server"):
        rid = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}).json()["id"]
        bad = client.post("/v1/completions", json={"prompt": "x", "n": 2}).headers["x-request-id"]
    lines = [r.getMessage() for r in caplog.records if r.name == "longcpm.server"]
    (ok,) = [m for m in lines if rid in m]
    assert "completion_tokens=3" in ok and "prompt_tokens=2" in ok and "latency=" in ok
    assert any(bad in m and "status=400" in m for m in lines)
