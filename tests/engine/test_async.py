"""AsyncLLM (the server's engine): concurrent streams equal single-request outputs, leaving a stream early or
aborting frees the sequence at once, shutdown drains or aborts, prompts get exactly one BOS."""

from __future__ import annotations

import asyncio

import pytest

from longcpm.engine import AsyncLLM, SamplingParams, StreamDelta
from longcpm.errors import RequestError

from .conftest import greedy, make_engine, prompt_ids, reference


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def _collect(agen) -> tuple[list[int], str, list[StreamDelta]]:
    deltas = [d async for d in agen]
    return [t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas), deltas


async def _idle(a: AsyncLLM) -> None:
    """Wait until the engine thread has dropped every request."""
    for _ in range(500):
        if not a.engine.requests and not a.engine.has_unfinished():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine still busy: {a.stats()}")


def test_concurrent_streams_equal_single_requests(llm):
    prompts = [prompt_ids(llm, n, seed=40 + i) for i, n in enumerate([5, 30, 12, 64, 3, 20, 41, 9, 17, 25, 2, 33])]
    params = [greedy(4 + i % 7) for i in range(len(prompts))]
    want = [reference(llm, p, sp) for p, sp in zip(prompts, params)]
    a = AsyncLLM.from_engine(make_engine(llm, max_num_seqs=5, max_num_batched_tokens=48), "tiny")

    async def main():
        outs = await asyncio.gather(*[_collect(a.generate(p, sp, f"r{i}"))
                                      for i, (p, sp) in enumerate(zip(prompts, params))])
        await a.shutdown()
        return outs

    outs = _run(main())
    assert [o[0] for o in outs] == want
    for (ids, text, deltas), p in zip(outs, prompts):
        assert text == llm.tokenizer.decode(ids, skip_special_tokens=True)
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"
        assert deltas[-1].prompt_tokens == len(p) and deltas[-1].completion_tokens == len(ids)
        assert not any(d.finished for d in deltas[:-1])
    assert a.engine.blocks.num_free == a.engine.blocks.num_pages - 1


def test_leaving_a_stream_early_aborts_it(llm):
    a = AsyncLLM.from_engine(make_engine(llm), "tiny")

    async def main():
        long = greedy(500)
        agen = a.generate(prompt_ids(llm, 20, seed=1), long, "leave")
        assert (await agen.__anext__()).token_ids
        await agen.aclose()  # a client disconnect
        task = asyncio.create_task(_collect(a.generate(prompt_ids(llm, 20, seed=2), long, "cancel")))
        while not a.engine.requests.get("cancel") or not a.engine.requests["cancel"].output_ids:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _idle(a)
        other = await _collect(a.generate(prompt_ids(llm, 8, seed=3), greedy(3), "after"))
        await a.shutdown()
        return other

    other = _run(main())
    assert len(other[0]) == 3
    assert a.engine.blocks.num_free == a.engine.blocks.num_pages - 1


def test_abort_ends_the_stream_with_abort(llm):
    a = AsyncLLM.from_engine(make_engine(llm), "tiny")

    async def main():
        agen = a.generate(prompt_ids(llm, 20, seed=4), greedy(500), "x")
        first = await agen.__anext__()
        await a.abort("x")  # returns once the pages are free
        free = a.engine.blocks.num_free
        rest = [d async for d in agen]
        await a.abort("unknown")  # harmless
        await a.shutdown()
        return first, rest, free

    first, rest, free = _run(main())
    assert not first.finished and rest and rest[-1].finished and rest[-1].finish_reason == "abort"
    assert free == a.engine.blocks.num_pages - 1


def test_validation_happens_before_streaming(llm):
    a = AsyncLLM.from_engine(make_engine(llm, max_model_len=64), "tiny")

    async def main():
        with pytest.raises(RequestError, match="maximum model length"):
            a.generate([1] * 60, greedy(10), "long")
        with pytest.raises(RequestError, match="empty"):
            a.generate([], greedy(1), "empty")
        agen = a.generate([1, 2, 3], greedy(3), "dup")
        first = await agen.__anext__()
        with pytest.raises(RequestError, match="in use"):
            a.generate([1, 2, 3], greedy(3), "dup")
        rest = [d async for d in agen]
        await a.shutdown()
        with pytest.raises(RequestError, match="shutting down"):
            a.generate([1, 2, 3], greedy(3), "late")
        return [first] + rest

    assert len(_run(main())) == 3


@pytest.mark.parametrize("drain", [True, False])
def test_shutdown_drains_or_aborts(llm, drain):
    a = AsyncLLM.from_engine(make_engine(llm), "tiny")

    async def main():
        task = asyncio.create_task(_collect(a.generate(prompt_ids(llm, 10, seed=5), greedy(40), "s")))
        while "s" not in a.engine.requests:
            await asyncio.sleep(0.005)
        await a.shutdown(drain=drain)
        await a.shutdown(drain=drain)  # idempotent
        return await task

    ids, _, deltas = _run(main())
    if drain:
        assert len(ids) == 40 and deltas[-1].finish_reason == "length"
    else:
        assert len(ids) < 40 and deltas[-1].finish_reason == "abort"
    assert a.engine.blocks.num_free == a.engine.blocks.num_pages - 1


def test_encode_prompt_adds_bos_exactly_once(llm):
    a = AsyncLLM.from_engine(make_engine(llm), "tiny")
    tok = llm.tokenizer
    assert a.model_name == "tiny" and a.max_model_len == llm.max_model_len
    assert a.encode_prompt("Hello") == [1] + tok.encode("Hello", add_special_tokens=False)
    assert a.encode_prompt("<s>Hello") == a.encode_prompt("Hello")
    assert a.encode_prompt([5, 6]) == [1, 5, 6] and a.encode_prompt([1, 5, 6]) == [1, 5, 6]
    chat = a.encode_prompt("", chat=[{"role": "user", "content": "Hi"}])
    rendered = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert chat == [1] + tok.encode(rendered, add_special_tokens=False) and chat.count(1) == 1
    with pytest.raises(RequestError):
        a.encode_prompt(3.5)
    _run(a.shutdown())


def test_seeded_streams_are_reproducible(llm):
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=11, ignore_eos=True)
    p = prompt_ids(llm, 15, seed=6)
    want = reference(llm, p, sp)
    a = AsyncLLM.from_engine(make_engine(llm), "tiny")

    async def main():
        outs = await asyncio.gather(*[_collect(a.generate(p, sp, f"q{i}")) for i in range(4)])
        await a.shutdown()
        return outs

    assert all(o[0] == want for o in _run(main()))
