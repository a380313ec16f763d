"""Tokenizer, chat template and streaming decode against the real MiniCPM4-0.5B tokenizer files."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from longcpm.errors import TokenizerError
from longcpm.text import StreamDecoder, Tokenizer, load_tokenizer

SHARED = Path(os.environ.get("LONGCPM_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
CKPT = SHARED / "checkpoints" / "minicpm4-0.5b"
if not (CKPT / "tokenizer.model").is_file():  # a clone without ../shared: the byte-identical packaged copy
    from longcpm.assets import asset_dir

    CKPT = asset_dir("minicpm4-0.5b")

IM_END, IM_START, NL = 73440, 73441, 5
BYTE_IDS = range(1089, 1345)  # <0x00> .. <0xFF>

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x * 12345 + 0.5  # v2.0\n\tprint(f(2024))",
    "你好，世界！今天的天气怎么样？我们来谈谈长上下文推理。",
    "emoji 😀🦜 and byte fallback 龘𝔘🕱🖄 done",
    "mixed 中文 English 12 日本語 한국어 Ω≈ç√∫ ＡＢＣ１２３",
    "  leading and trailing spaces  ",
    "\n\n\nnewlines\n\ttabs\r\n",
    "<div>html</div> <SEP> literal ▁ marker",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(CKPT)


@pytest.fixture(scope="module")
def sp():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(CKPT / "tokenizer.model"))


def test_properties(tok):
    assert tok.vocab_size == 73448
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, IM_END, 2)
    assert tok.eos_token_ids == {2, IM_END}
    assert tok.add_bos_token is True and tok.add_eos_token is False
    assert tok.all_special_ids == {0, 1, 2, *range(73440, 73448)}
    assert tok.token_to_id("<|im_start|>") == IM_START and tok.token_to_id("\n") == NL
    assert tok.token_to_id("definitely-not-a-piece") is None
    assert tok.convert_ids_to_tokens(NL) == "\n"
    assert tok.convert_ids_to_tokens([1, 73447, 1089]) == ["<s>", "<|fim_suffix|>", "<0x00>"]


def test_no_dummy_prefix(tok, sp):
    # The normalizer inserts no "▁" at the start; a real leading space becomes its own "▁".
    assert sp.id_to_piece(sp.encode("hello")[0]) == "hello"
    assert tok.encode("hello", add_special_tokens=False) == sp.encode("hello")
    assert tok.convert_ids_to_tokens(tok.encode(" hello", add_special_tokens=False)) == ["▁hello"]


@pytest.mark.parametrize("text", TEXTS)
def test_matches_sentencepiece_and_round_trips(tok, sp, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == sp.encode(text)
    assert tok.convert_ids_to_tokens(ids) == [sp.id_to_piece(i) for i in ids]
    expected = text.replace("▁", " ")  # a literal "▁" is the space marker, so it decodes as a space
    assert tok.decode(ids) == expected
    with_bos = tok.encode(text)
    assert with_bos == [1, *ids]
    assert tok.decode(with_bos, skip_special_tokens=True) == expected
    assert tok.decode(with_bos) == "<s>" + expected


def test_random_text_matches_sentencepiece(tok, sp):
    rng = random.Random(1)
    alphabet = "ab zZ09_-.,:;()<>|\n\t\r  你好世界长文本龘𝔘😀🕱é한▁"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == text.replace("▁", " ")


def test_digits_newline_and_byte_fallback(tok):
    assert tok.convert_ids_to_tokens(tok.encode("x=12345", add_special_tokens=False))[-5:] == list("12345")
    assert tok.encode("\n", add_special_tokens=False) == [NL]
    ids = tok.encode("龘𝔘", add_special_tokens=False)
    assert len(ids) == 7 and all(i in BYTE_IDS for i in ids)
    assert tok.decode(ids) == "龘𝔘"


def test_special_tokens_are_single_ids(tok, sp):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids == [1, IM_START, *sp.encode("user\nhi"), IM_END]
    assert NL in ids
    assert tok.decode(ids) == "<s><|im_start|>user\nhi<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    names = ["<|im_end|>", "<|im_start|>", "<|tool_call|>", "<|execute_start|>", "<|execute_end|>",
             "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    assert tok.encode("".join(names), add_special_tokens=False) == list(range(73440, 73448))
    # Like HF's slow tokenizer, the base special strings in text also map to their ids.
    assert tok.encode("a</s><s>b", add_special_tokens=False) == [*sp.encode("a"), 2, 1, *sp.encode("b")]
    # Segments around special tokens are encoded as-is, without a dummy prefix or stripping.
    text = "x <|im_end|> y"
    assert tok.encode(text, add_special_tokens=False) == [*sp.encode("x "), IM_END, *sp.encode(" y")]
    assert tok.decode(tok.encode(text)) == "<s>" + text


def test_bos_handling(tok):
    assert tok.encode("") == [1]
    assert tok.encode("", add_special_tokens=False) == []
    assert tok.encode("hi")[0] == 1 and tok.encode("hi", add_special_tokens=False)[0] != 1
    assert tok.decode([]) == ""


def test_chat_template(tok):
    one = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(one) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(one, add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"
    ids = tok.apply_chat_template(one, tokenize=True)
    assert ids == [IM_START, *tok.encode("user", False), NL, *tok.encode("Hi", False), IM_END, NL,
                   IM_START, *tok.encode("assistant", False), NL]
    assert tok.apply_chat_template(one, tokenize=True, add_special_tokens=True) == [1, *ids]
    multi = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "你好"},
    ]
    assert tok.apply_chat_template(multi) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "messages",
    [None, "hi", [], [("user", "hi")], [{"role": "user"}], [{"role": "user", "content": 3}],
     [{"role": "", "content": "x"}], [{"role": None, "content": "x"}]],
)
def test_bad_messages(tok, messages):
    with pytest.raises(TokenizerError):
        tok.apply_chat_template(messages)


def _stream(tok, ids, skip=True):
    dec = StreamDecoder(tok, skip_special_tokens=skip)
    parts = [dec.push(i) for i in ids]
    return parts, parts + [dec.flush()]


@pytest.mark.parametrize("skip", [True, False])
def test_stream_matches_full_decode(tok, skip):
    text = "<|im_start|>assistant\n你好！龘𝔘🕱 emoji 😀🦜 and code: x = 42;<|im_end|>"
    ids = tok.encode(text)
    parts, everything = _stream(tok, ids, skip)
    assert "".join(everything) == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in p for p in everything)
    assert everything[-1] == ""  # nothing was left pending
    byte_runs = [p for i, p in zip(ids, parts) if i in BYTE_IDS]
    assert "" in byte_runs and "龘" in byte_runs  # multi-byte chars appear only on their last byte


def test_stream_random_sequences(tok):
    # Arbitrary ids (lone continuation bytes, truncated characters, specials) still concatenate to decode().
    rng = random.Random(0)
    pool = [*BYTE_IDS, *range(1345, 1400), *range(59320, 59400), 5, 1, 2, IM_END, IM_START]
    for _ in range(200):
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 30))]
        for skip in (True, False):
            _, everything = _stream(tok, ids, skip)
            assert "".join(everything) == tok.decode(ids, skip_special_tokens=skip)


def test_stream_window_stays_small_and_resets(tok):
    ids = tok.encode("长上下文推理 long context " * 200, add_special_tokens=False)
    dec = StreamDecoder(tok)
    out = []
    for i in ids:
        out.append(dec.push(i))
        assert len(dec._ids) <= 8
    assert "".join(out) + dec.flush() == tok.decode(ids)
    assert dec.push(tok.token_to_id("<0xE4>")) == "" and dec.flush() == "\ufffd"  # truncated tail at the end
    assert dec.push(NL) == "\n"  # flush reset the decoder for a new sequence


def test_save_round_trip(tok, tmp_path):
    out = tok.save(tmp_path / "tiny")
    assert {p.name for p in out.iterdir()} == {
        "tokenizer.model", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"}
    again = load_tokenizer(out)
    text = TEXTS[3] + "<|im_end|>"
    assert again.encode(text) == tok.encode(text)
    assert again.apply_chat_template([{"role": "user", "content": "Hi"}]) == tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}])
    assert again.eos_token_id == IM_END and again.vocab_size == 73448


def test_error_paths(tok, tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        load_tokenizer(bad)
    shutil.copyfile(CKPT / "tokenizer.model", bad / "tokenizer.model")
    (bad / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        load_tokenizer(bad)
    (bad / "tokenizer_config.json").unlink()
    bare = load_tokenizer(bad)  # SentencePiece model alone: LlamaTokenizer defaults, no chat template
    assert (bare.bos_token_id, bare.eos_token_id, bare.vocab_size) == (1, 2, 73440)
    with pytest.raises(TokenizerError, match="no chat_template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(TokenizerError):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([73448])
    with pytest.raises(TokenizerError):
        StreamDecoder(tok).push(-1)


def test_template_raise_exception(tmp_path):
    folder = tmp_path / "strict"
    shutil.copytree(CKPT, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}" \
                           "{% endif %}{{ bos_token }}{% for m in messages %}\n  {{ m['content'] }}\n  {% endfor %}"
    (folder / "tokenizer_config.json").chmod(0o644)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    strict = load_tokenizer(folder)
    with pytest.raises(TokenizerError, match="first must be user"):
        strict.apply_chat_template([{"role": "system", "content": "x"}])
    # trim_blocks/lstrip_blocks drop the newline after a tag and the indent before one; text indent stays
    assert strict.apply_chat_template([{"role": "user", "content": "x"}]) == "<s>  x\n"


def _tokenizers_folder(tmp_path: Path) -> Path:
    """A tiny tokenizer.json (trained here) next to the real tokenizer.model: the json must win."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    hf.train_from_iterator(["hello world", "hello there", "the world is wide", "long context"] * 10, trainer)
    folder = tmp_path / "fast"
    folder.mkdir()
    hf.save(str(folder / "tokenizer.json"))
    shutil.copyfile(CKPT / "tokenizer.model", folder / "tokenizer.model")
    n = hf.get_vocab_size()
    special = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": True}
    decoder = {str(i): {"content": c, **special} for i, c in enumerate(["<unk>", "<s>", "</s>"])}
    decoder |= {str(n): {"content": "<|im_end|>", **special}, str(n + 1): {"content": "<|im_start|>", **special}}
    cfg = {"add_bos_token": True, "bos_token": "<s>", "eos_token": "<|im_end|>", "added_tokens_decoder": decoder,
           "chat_template": json.loads((CKPT / "tokenizer_config.json").read_text())["chat_template"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def test_tokenizers_backend(tmp_path):
    folder = _tokenizers_folder(tmp_path)
    fast = load_tokenizer(folder)
    n = fast.vocab_size - 2
    assert fast.vocab_size < 1000  # served by tokenizer.json, not the 73440-piece SentencePiece model
    assert fast.eos_token_id == n and fast.token_to_id("<|im_start|>") == n + 1
    ids = fast.encode("<|im_start|>hello world<|im_end|>")
    assert ids[:2] == [1, n + 1] and ids[-1] == n and n not in ids[2:-1]
    assert fast.decode(ids, skip_special_tokens=True) == "hello world"
    prompt = fast.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=True)
    assert prompt[0] == n + 1 and prompt.count(n + 1) == 2
    _, everything = _stream(fast, ids)
    assert "".join(everything) == fast.decode(ids, skip_special_tokens=True)
    assert {p.name for p in fast.save(tmp_path / "copy").iterdir()} >= {"tokenizer.json", "tokenizer.model"}


def _reference():
    """HF's slow SentencePiece tokenizer when transformers is installed (v4: LlamaTokenizer, v5: its base)."""
    transformers = pytest.importorskip("transformers")
    try:
        if int(transformers.__version__.split(".")[0]) < 5:
            return transformers.LlamaTokenizer.from_pretrained(str(CKPT), legacy=True), True
        # v5's LlamaTokenizer is converted to tokenizers (needs protobuf); the slow base still encodes like v4,
        # but neither adds BOS nor reassembles byte pieces when decoding, so compare encoding only.
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

        return SentencePieceBackend.from_pretrained(str(CKPT)), False
    except Exception as e:  # missing optional dependencies of transformers itself
        pytest.skip(f"transformers reference tokenizer unavailable: {e}")


def test_matches_transformers(tok):
    ref, full = _reference()
    extra = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "a</s><s>b<unk>", "x <|im_end|> y"]
    for text in TEXTS + extra:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False), text
        if full:
            assert tok.encode(text) == ref.encode(text)
            assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi 你好"}]
    assert tok.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ref_ids = ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ref_ids = ref_ids if isinstance(ref_ids, list) else ref_ids["input_ids"]
    assert tok.apply_chat_template(msgs, tokenize=True) == ref_ids
