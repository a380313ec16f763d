"""The generation engine on a tiny random checkpoint (real tokenizer, fp32, CPU): cache correctness, batching,
seeded sampling, stop conditions, prompt handling, request validation and streaming."""

from __future__ import annotations

import pytest
import torch

from longcpm.engine import LLM, SamplingParams
from longcpm.errors import RequestError
from longcpm.models.random import create_random_checkpoint
from longcpm.ops.sampling import filter_logits, sample

PROMPTS = ["Hello, my name is", "你好，今天的天气怎么样？我们", "def add(a, b):\n    return", "1 2 3"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return create_random_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=3, dtype="float32")


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, device="cpu", dtype="float32")


def _ids(out):
    return out.outputs[0].token_ids


def test_cached_generation_equals_full_recompute(llm):
    ids = llm.tokenizer.encode(PROMPTS[1])
    got = _ids(llm.generate(PROMPTS[1], GREEDY)[0])
    seq = list(ids)
    with torch.no_grad():
        for _ in range(GREEDY.max_tokens):
            logits = llm.model(torch.tensor([seq]))[0, -1]
            seq.append(int(logits.argmax()))
    assert got == seq[len(ids):]
    assert len(set(got)) > 1  # the random model must not be degenerate, or this test proves nothing


def test_batched_equals_one_by_one(llm):
    prompts = PROMPTS + [llm.tokenizer.encode("short")]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (5, 12, 3, 9, 7)]
    batched = llm.generate(prompts, params)
    single = [llm.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    assert [_ids(o) for o in batched] == [_ids(o) for o in single]
    assert [o.outputs[0].text for o in batched] == [o.outputs[0].text for o in single]
    assert [len(_ids(o)) for o in batched] == [5, 12, 3, 9, 7]
    assert [o.request_id for o in batched] == list(range(5))


def test_batches_larger_than_max_num_seqs(llm):
    llm.engine.max_num_seqs, old = 2, llm.engine.max_num_seqs
    try:
        outs = llm.generate(PROMPTS, GREEDY)
    finally:
        llm.engine.max_num_seqs = old
    assert [_ids(o) for o in outs] == [_ids(o) for o in llm.generate(PROMPTS, GREEDY)]


def test_seeded_sampling_reproducible_and_batch_independent(llm):
    sp = SamplingParams(temperature=1.0, top_p=0.95, top_k=200, max_tokens=10, seed=1234, ignore_eos=True)
    alone = _ids(llm.generate(PROMPTS[0], sp)[0])
    assert _ids(llm.generate(PROMPTS[0], sp)[0]) == alone
    others = [SamplingParams(temperature=0.7, max_tokens=4, seed=5), GREEDY, SamplingParams(temperature=1.3)]
    outs = llm.generate([PROMPTS[2], PROMPTS[0], PROMPTS[3], PROMPTS[1]], [others[0], sp, others[1], others[2]])
    assert _ids(outs[1]) == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, top_k=200, max_tokens=10, seed=99, ignore_eos=True)
    assert _ids(llm.generate(PROMPTS[0], other_seed)[0]) != alone
    assert alone != _ids(llm.generate(PROMPTS[0], GREEDY)[0])[:10]


def test_unseeded_sampling_follows_torch_manual_seed(llm):
    sp = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    torch.manual_seed(0)
    a = _ids(llm.generate(PROMPTS[0], sp)[0])
    torch.manual_seed(0)
    assert _ids(llm.generate(PROMPTS[0], sp)[0]) == a


def test_sampling_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    best = logits.argmax(-1)
    ones, zeros = torch.ones(3), torch.zeros(3)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    k1 = torch.ones(3, dtype=torch.long)
    k0 = torch.zeros(3, dtype=torch.long)
    assert torch.equal(sample(logits, ones, ones, k1, zeros, gens), best)  # top_k 1
    assert torch.equal(sample(logits, ones, torch.full((3,), 1e-6), k0, zeros, gens), best)  # tiny top_p
    assert torch.equal(sample(logits, ones, ones, k0, ones, gens), best)  # min_p 1
    assert torch.equal(sample(logits, zeros, ones, k0, zeros, [None] * 3), best)  # temperature 0
    kept = filter_logits(logits, torch.tensor([5, 0, 0]), torch.tensor([1.0, 0.5, 1.0]), torch.tensor([0, 0, 0.1]))
    alive = kept > torch.finfo(kept.dtype).min
    assert alive[0].sum() == 5 and torch.equal(alive[0], logits[0] >= logits[0].topk(5).values[-1])
    p = logits[1].softmax(-1).sort(descending=True).values
    assert alive[1].sum() == int((p.cumsum(-1) - p < 0.5).sum())  # smallest set whose mass reaches 0.5
    probs = logits[2].softmax(-1)
    assert torch.equal(alive[2], probs >= 0.1 * probs.max())
    draws = {int(sample(logits[:1], ones[:1], ones[:1], torch.tensor([3]), zeros[:1], [gens[0]])) for _ in range(50)}
    assert draws <= set(logits[0].topk(3).indices.tolist()) and len(draws) > 1


def test_stop_string_truncates_and_stops(llm):
    full = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].outputs[0]
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = text.find(stop)
    pieces: list[str] = []
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=["zzzz", stop]),
                       on_token=lambda i, t, tok: pieces.append(t))[0].outputs[0]
    assert out.text == text[:cut] and "".join(pieces) == out.text
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == full.token_ids[: len(out.token_ids)] and len(out.token_ids) < 16


def test_stop_token_ids_and_eos(llm):
    full = _ids(llm.generate(PROMPTS[2], GREEDY)[0])
    target = full[4]
    first = full.index(target)
    out = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[target]))[0].outputs[0]
    assert out.token_ids == full[: first + 1] and out.finish_reason == "stop" and out.stop_reason == target
    assert out.text == llm.tokenizer.decode(full[:first], skip_special_tokens=True)
    old = llm.engine.eos_ids
    llm.engine.eos_ids = frozenset({target})  # make the model "emit eos" at a known step
    try:
        eos = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
        ignored = llm.generate(PROMPTS[2], GREEDY)[0].outputs[0]
    finally:
        llm.engine.eos_ids = old
    assert eos.token_ids == full[: first + 1] and eos.finish_reason == "stop"
    assert ignored.token_ids == full and ignored.finish_reason == "length"
    assert {2, 73440} <= old


def test_max_tokens_gives_length(llm):
    out = llm.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(_ids(out)) == 3 and out.outputs[0].finish_reason == "length"
    assert out.num_generated_tokens == 3 and out.metrics.decode_steps == 2


def test_prompt_forms(llm):
    text = PROMPTS[0]
    encoded = llm.tokenizer.encode(text)
    assert encoded[0] == 1  # BOS from tokenizer_config.add_bos_token
    by_text = llm.generate(text, GREEDY)[0]
    assert by_text.prompt == text and by_text.prompt_token_ids == encoded
    raw = encoded[1:]
    by_ids = llm.generate(raw, GREEDY)[0]  # a single list of ids is one prompt, used exactly as given
    assert by_ids.prompt is None and by_ids.prompt_token_ids == raw
    assert _ids(llm.generate([encoded], GREEDY)[0]) == _ids(by_text)
    chat = llm.chat([{"role": "user", "content": "Hi"}], GREEDY)[0]
    rendered = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert chat.prompt == rendered and chat.prompt_token_ids == llm.tokenizer.encode(rendered, add_special_tokens=False)
    two = llm.chat([[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Yo"}]], GREEDY)
    assert len(two) == 2 and _ids(two[0]) == _ids(chat)


def test_request_errors(llm, ckpt):
    with pytest.raises(RequestError, match="maximum model length"):
        llm.generate([1] * 32760, SamplingParams(max_tokens=16))
    short = LLM(ckpt, device="cpu", max_model_len=16)
    with pytest.raises(RequestError, match="16"):
        short.generate("Hello", SamplingParams(max_tokens=15))
    with pytest.raises(RequestError, match="empty"):
        llm.generate([[]])
    with pytest.raises(RequestError, match="token ids"):
        llm.generate([[1, 2, 10**6]])
    with pytest.raises(RequestError, match="sampling_params"):
        llm.generate(["a", "b"], [GREEDY])
    with pytest.raises(RequestError):
        llm.generate(123)


@pytest.mark.parametrize("kwargs", [
    {"max_tokens": -1}, {"max_tokens": 0}, {"temperature": -0.1}, {"temperature": float("nan")}, {"top_p": 0},
    {"top_p": 1.5}, {"top_k": -2}, {"top_k": 2.5}, {"min_p": 1.5}, {"seed": "x"}, {"stop": [""]}, {"stop": [3]},
    {"stop_token_ids": [-1]}, {"ignore_eos": 1},
])
def test_bad_sampling_params(kwargs):
    with pytest.raises(RequestError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_streaming_concatenates_to_final_text(llm):
    pieces: dict[int, list[str]] = {}
    calls: dict[int, list[int]] = {}

    def on_token(i, text, tok):
        pieces.setdefault(i, []).append(text)
        calls.setdefault(i, []).append(tok)

    params = [SamplingParams(temperature=1.0, max_tokens=24, seed=s, ignore_eos=True) for s in range(len(PROMPTS))]
    outs = llm.generate(PROMPTS, params, on_token=on_token, use_tqdm=True)
    for o in outs:
        assert "".join(pieces[o.request_id]) == o.outputs[0].text
        assert calls[o.request_id] == o.outputs[0].token_ids
        assert o.outputs[0].text == llm.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True)


def test_sparse_attention_cached_equals_full_recompute(ckpt):
    """InfLLM-V2 always on (dense_len -1): the cached decode path must pick what a full recompute picks."""
    sc = {"kernel_size": 32, "kernel_stride": 16, "block_size": 64, "init_blocks": 1, "window_size": 64, "topk": 2,
          "dense_len": -1}
    sparse = LLM(ckpt, device="cpu", attention="sparse", sparse_config=sc)
    prompts = [list(range(1000, 1160)), list(range(2000, 2100))]
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outs = sparse.generate(prompts, sp)
    for prompt, out in zip(prompts, outs):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(sp.max_tokens):
                seq.append(int(sparse.model(torch.tensor([seq]), attention="sparse")[0, -1].argmax()))
        assert _ids(out) == seq[len(prompt):]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generation(ckpt, llm):
    """Same engine on CUDA: greedy matches the CPU run, seeded sampling is batch independent there too."""
    gpu = LLM(ckpt, device="cuda", dtype="float32")
    assert [_ids(o) for o in gpu.generate(PROMPTS, GREEDY)] == [_ids(o) for o in llm.generate(PROMPTS, GREEDY)]
    sp = SamplingParams(temperature=0.9, top_p=0.9, top_k=100, min_p=0.01, max_tokens=10, seed=7, ignore_eos=True)
    alone = _ids(gpu.generate(PROMPTS[1], sp)[0])
    batch = gpu.generate(PROMPTS, [GREEDY, sp, SamplingParams(temperature=1.0, seed=1), GREEDY])
    assert _ids(batch[1]) == alone
