"""The official `openai` package, unchanged, against the server over the tiny random checkpoint: models, chat,
chat streaming (with usage), completions (text and token ids), streaming, stop, seed, extras, and errors
surfacing as the client's own exception types. Greedy outputs must equal the offline LLM's."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def oai(real_server):
    return openai.OpenAI(base_url=real_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(real_server):
    from longcpm.engine import LLM

    return LLM(real_server.folder, device="cpu")


def _ref(llm, prompt=None, messages=None, **kw):
    from longcpm.engine import SamplingParams

    p = SamplingParams(temperature=0, **kw)
    out = llm.chat(messages, p, add_bos=True)[0] if messages else llm.generate(prompt, p)[0]
    return out.outputs[0]


def test_models(oai):
    assert [m.id for m in oai.models.list()] == ["tiny"]
    assert oai.models.retrieve("tiny").id == "tiny"


def test_chat(oai, llm):
    r = oai.chat.completions.create(model="tiny", messages=MSGS, max_tokens=12, temperature=0)
    ref = _ref(llm, messages=MSGS, max_tokens=12)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (ref.text, ref.finish_reason)
    assert r.usage.completion_tokens == len(ref.token_ids) and r.usage.prompt_tokens == len(
        llm.tokenizer.encode(llm.tokenizer.apply_chat_template(MSGS), add_special_tokens=True))


def test_chat_stream(oai):
    kw = dict(model="tiny", messages=MSGS, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-2].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == full.choices[0].message.content
    assert len({c.id for c in chunks}) == 1


def test_completions(oai, llm):
    prompt = "The capital of France is"
    r = oai.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    ref = _ref(llm, prompt=prompt, max_tokens=12)
    assert r.id.startswith("cmpl-") and (r.choices[0].text, r.choices[0].finish_reason) == (ref.text,
                                                                                            ref.finish_reason)
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode(prompt)) and r.usage.completion_tokens == len(
        ref.token_ids)
    streamed = oai.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == ref.text
    ids = llm.tokenizer.encode(prompt)
    assert oai.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0).choices[0].text == ref.text


def test_sampling_fields(oai):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=16, extra_body={"ignore_eos": True, "top_k": 50})
    a = oai.completions.create(**kw, temperature=0.9, seed=123)
    b = oai.completions.create(**kw, temperature=0.9, seed=123)
    assert a.choices[0].text == b.choices[0].text and a.usage.completion_tokens == 16
    assert a.choices[0].finish_reason == "length"
    text = oai.completions.create(**kw, temperature=0).choices[0].text
    stop = text.strip()[:2]
    cut = oai.completions.create(**kw, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text


def test_errors_are_client_exceptions(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny", messages=MSGS, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4o", messages=MSGS)
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="tiny", prompt="hi " * 600, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    assert oai.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens <= 2


def test_api_key_with_client(serve):
    from .fakes import ScriptedEngine

    srv = serve(ScriptedEngine(model_name="tiny"), api_key="k3y")
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=srv.url + "/v1", api_key="k3y", max_retries=0)
    assert good.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3).usage.completion_tokens == 3
