"""Bounded load generator for a running `longcpm serve`: N concurrent streaming greedy clients for a few seconds.

    python -m longcpm.server.bench --url http://127.0.0.1:8000 --concurrency 1 16 64 --duration 10

Each client loops over a few prompts with temperature 0 and ignore_eos, so every answer must be exactly
max_tokens long and equal the answer the same prompt gets when it runs alone (fetched first, one at a time):
batching must not change results. Reports output tokens/s and p50/p99 of time-to-first-token and total latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass

import httpx

PROMPTS = [
    "The history of the printing press begins",
    "Write a short poem about the sea.",
    "In mathematics, a prime number is",
    "List three uses of copper: 1.",
    "A long time ago, in a small village by the mountains, there lived an old clockmaker who",
    "Q: What is the boiling point of water at sea level?\nA:",
]


@dataclass
class Result:
    text: str
    finish_reason: str | None
    completion_tokens: int | None
    ttft: float | None
    latency: float
    done: bool
    error: str | None = None


async def stream_once(client: httpx.AsyncClient, prompt: str, *, model: str, max_tokens: int, chat: bool) -> Result:
    """One streaming greedy request; the text, how it ended, and its timings (TTFT = first chunk with text)."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    t0 = time.perf_counter()
    pieces, finish, usage, ttft, done = [], None, None, None, False
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return Result("", None, None, None, time.perf_counter() - t0, False,
                              f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                obj = json.loads(line[6:])
                if obj.get("usage"):
                    usage = obj["usage"]["completion_tokens"]
                for c in obj.get("choices", []):
                    text = c["delta"].get("content") if chat else c.get("text")
                    if text:
                        ttft = ttft if ttft is not None else time.perf_counter() - t0
                        pieces.append(text)
                    finish = c.get("finish_reason") or finish
    except httpx.HTTPError as e:
        return Result("".join(pieces), finish, usage, ttft, time.perf_counter() - t0, False, repr(e))
    return Result("".join(pieces), finish, usage, ttft, time.perf_counter() - t0, done)


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100])."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(-(-q * len(s) // 100)) - 1))]


def check(res: Result, ref: str, max_tokens: int) -> str | None:
    """Why a result is wrong (incomplete or different from the single-request output), or None."""
    if res.error:
        return res.error
    if not res.done:
        return "stream ended without [DONE]"
    if res.finish_reason != "length" or res.completion_tokens != max_tokens:
        return f"incomplete: finish_reason {res.finish_reason}, {res.completion_tokens}/{max_tokens} tokens"
    if res.text != ref:
        return "output differs from the single-request output"
    return None


async def run_level(client, concurrency: int, duration: float, prompts: list[str], refs: list[str], *,
                    model: str, max_tokens: int, chat: bool) -> dict:
    results: list[Result] = []
    problems: list[str] = []
    deadline = time.perf_counter() + duration

    async def worker(w: int) -> None:
        k = w
        while time.perf_counter() < deadline:
            i = k % len(prompts)
            res = await stream_once(client, prompts[i], model=model, max_tokens=max_tokens, chat=chat)
            results.append(res)
            why = check(res, refs[i], max_tokens)
            if why:
                problems.append(f"prompt {i}: {why}")
            k += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - t0
    tokens = sum(r.completion_tokens or 0 for r in results)
    ttfts = [r.ttft for r in results if r.ttft is not None]
    lats = [r.latency for r in results if not r.error]
    return {"concurrency": concurrency, "requests": len(results), "completion_tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1) if wall else 0.0,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "latency_p50_s": percentile(lats, 50), "latency_p99_s": percentile(lats, 99),
            "failures": len(problems), "problems": problems[:5]}


async def run_load(url: str, concurrency: list[int], *, duration: float = 5.0, max_tokens: int = 64,
                   api_key: str | None = None, model: str | None = None, chat: bool = False,
                   prompts: list[str] | None = None) -> list[dict]:
    """References first (one request at a time), then each concurrency level for `duration` seconds."""
    prompts = prompts or PROMPTS
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(concurrency) + 4, max_keepalive_connections=max(concurrency) + 4)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(600.0, connect=30.0)) as client:
        if model is None:
            r = await client.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        refs = []
        for p in prompts:
            res = await stream_once(client, p, model=model, max_tokens=max_tokens, chat=chat)
            if res.error or res.finish_reason != "length" or res.completion_tokens != max_tokens:
                raise RuntimeError(f"reference request failed: {res}")
            refs.append(res.text)
        return [await run_level(client, c, duration, prompts, refs, model=model, max_tokens=max_tokens, chat=chat)
                for c in concurrency]


def format_row(row: dict) -> str:
    def ms(x):
        return f"{x * 1000:8.1f}" if x is not None else "       -"

    return (f"{row['concurrency']:>5} {row['requests']:>8} {row['completion_tokens']:>9} {row['tokens_per_s']:>9.1f} "
            f"{ms(row['ttft_p50_s'])} {ms(row['ttft_p99_s'])} {ms(row['latency_p50_s'])} {ms(row['latency_p99_s'])} "
            f"{row['failures']:>6}")


HEADER = "streams requests    tokens  tokens/s ttft p50 ttft p99  lat p50  lat p99 failed   (times in ms)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m longcpm.server.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per concurrency level")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions instead of /v1/completions")
    p.add_argument("--model", help="model id (default: the first of /v1/models)")
    p.add_argument("--api-key")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    try:
        rows = asyncio.run(run_load(args.url, args.concurrency, duration=args.duration, max_tokens=args.max_tokens,
                                    api_key=args.api_key, model=args.model, chat=args.chat))
    except (httpx.HTTPError, RuntimeError) as e:
        print(f"bench: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(HEADER)
    for row in rows:
        print(format_row(row))
        for why in row["problems"]:
            print(f"      ! {why}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 1 if any(r["failures"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
