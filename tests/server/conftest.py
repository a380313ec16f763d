"""Server test fixtures: a uvicorn server in a background thread on 127.0.0.1 (free port) around an engine.

Test modules call pytest.importorskip for fastapi / uvicorn / httpx / openai, so without the `server` extra
the folder is skipped, not failed. End-to-end tests serve the real AsyncLLM over a tiny random checkpoint.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest


class ServerThread:
    """uvicorn.Server on a pre-bound socket in a daemon thread; stop() runs the app's lifespan shutdown."""

    def __init__(self, app, graceful_timeout: float = 5.0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=graceful_timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture
def serve():
    """serve(engine, graceful_timeout=5, **create_app_kw) -> ServerThread (started; stopped at teardown)."""
    from longcpm.server.app import create_app

    started = []

    def make(engine, graceful_timeout: float = 5.0, **kw) -> ServerThread:
        srv = ServerThread(create_app(engine, **kw), graceful_timeout).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from longcpm.models.random import create_random_checkpoint

    return create_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0, dtype="float32")


def make_real_engine(folder, max_num_seqs: int = 64):
    from longcpm.engine.async_engine import AsyncLLM

    return AsyncLLM(folder, device="cpu", max_model_len=512, max_num_seqs=max_num_seqs, kv_cache_tokens=16384,
                    model_name="tiny")


@pytest.fixture(scope="session")
def real_server(tiny_dir):
    """A session-wide server over the tiny random checkpoint, served as model 'tiny'."""
    from longcpm.server.app import create_app

    engine = make_real_engine(tiny_dir)
    srv = ServerThread(create_app(engine)).start()
    srv.engine, srv.folder = engine, tiny_dir
    yield srv
    srv.stop()
