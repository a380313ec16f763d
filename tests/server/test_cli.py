"""`longcpm serve`: the argparse wiring, and a real process (tiny checkpoint) that serves, logs request ids and
shuts down gracefully on SIGTERM, letting an in-flight stream finish."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

SRC = Path(__file__).resolve().parents[2] / "src"
LAUNCH = ("import argparse, sys; from longcpm.server.cli import add_serve_parser; p = argparse.ArgumentParser(); "
          "add_serve_parser(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")


def test_parser_defaults_and_options():
    from longcpm.server.cli import add_serve_parser, cmd_serve

    p = argparse.ArgumentParser()
    add_serve_parser(p.add_subparsers(dest="command"))
    a = p.parse_args(["serve", "--model", "m"])
    assert (a.host, a.port, a.api_key is None or "LONGCPM_API_KEY" in os.environ, a.attention) == (
        "127.0.0.1", 8000, True, "auto")
    assert a.func is cmd_serve
    a = p.parse_args(["serve", "--model", "m", "--port", "9", "--api-key", "k", "--served-model-name", "x",
                      "--device", "cpu", "--dtype", "float32", "--attention", "dense", "--max-num-seqs", "4",
                      "--max-model-len", "128"])
    assert (a.port, a.api_key, a.served_model_name, a.max_num_seqs, a.max_model_len) == (9, "k", "x", 4, 128)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_process_sigterm_drains(tiny_dir):
    pytest.importorskip("longcpm.engine.async_engine", reason="the async engine is not available yet")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "serve", "--model", str(tiny_dir), "--port", str(port),
                             "--device", "cpu", "--max-model-len", "512", "--served-model-name", "tiny"],
                            env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        lines = []
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 60, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            rid = r.headers["x-request-id"]
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 4:
                    proc.send_signal(signal.SIGTERM)
        assert lines[-2:] == ["data: [DONE]", ""], lines[-3:]
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown, so the exit status says "terminated"
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        err = proc.stderr.read()
        assert rid in err and "completion_tokens=60" in err and "shutting down" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
