"""Bounded load on loopback: many concurrent streaming greedy clients for a few seconds against the tiny model.
Every output must be complete and equal the single-request output; throughput and latency percentiles are
printed (they measure this CPU and the tiny model, not the engine's GPU speed)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def test_concurrent_streams_match_single_requests(real_server, capsys):
    from longcpm.server.bench import HEADER, format_row, run_load

    rows = asyncio.run(run_load(real_server.url, [1, 16, 64], duration=2.0, max_tokens=16))
    with capsys.disabled():
        print("\nserver load test (AsyncLLM, tiny random checkpoint, CPU, 16 tokens/request)")
        print(HEADER)
        for row in rows:
            print(format_row(row))
    for row in rows:
        assert row["failures"] == 0, row["problems"]
        assert row["requests"] >= row["concurrency"]
