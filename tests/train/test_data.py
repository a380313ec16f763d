"""Token shards, the document mix, row packing (labels, cu_seqlens, splits), resume and rank slicing."""

import json

import numpy as np
import pytest

from longcpm.train.data import (
    IGNORE,
    DataMix,
    Packer,
    ShardSource,
    SyntheticSource,
    TokenShards,
    collate,
    rank_slice,
    tokenize_files,
)

TEXTS = [f"Document number {i} says: " + "lorem ipsum dolor sit amet " * (i % 7 + 1) for i in range(23)]


@pytest.fixture
def shards(tmp_path, tokenizer):
    jl = tmp_path / "a.jsonl"
    jl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS[:20])) + "\n")
    txt = tmp_path / "b.txt"
    txt.write_text(TEXTS[20])
    return tokenize_files([jl, txt], tmp_path / "shards", tokenizer, shard_tokens=120)


def test_tokenize_files(shards, tokenizer):
    index = json.loads((shards / "index.json").read_text())
    assert index["num_docs"] == 21 and len(index["shards"]) > 1 and index["dtype"] == "uint32"
    ts = TokenShards(shards)
    for i in (0, 5, 19, 20):
        want = tokenizer.encode(TEXTS[i]) + [tokenizer.eos_token_id]
        assert ts.doc(i).tolist() == want
    assert sum(len(ts.doc(i)) for i in range(21)) == index["num_tokens"]
    assert not list(shards.parent.glob(".shards.tmp*"))


def test_tokenize_bad_jsonl(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no string field 'text'"):
        tokenize_files([bad], tmp_path / "out", tokenizer)


def _stream(source, n_docs):
    return [source.doc(k) for k in range(n_docs)]


def test_packing_labels_and_boundaries(shards):
    src = ShardSource(shards, seed=1)
    docs = _stream(src, 60)
    stream = np.concatenate(docs).astype(np.int64)
    doc_id = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
    p = Packer(DataMix([ShardSource(shards, seed=1)], seed=0), seq_len=48)
    for r in range(12):
        row = p.next_row()
        lo = r * 48
        assert row.input_ids.tolist() == stream[lo: lo + 48].tolist()
        seg = doc_id[lo: lo + 49]
        for t in range(48):
            want = stream[lo + t + 1] if seg[t + 1] == seg[t] else IGNORE
            assert row.labels[t] == want
        cuts = [0] + [t for t in range(1, 48) if seg[t] != seg[t - 1]] + [48]
        assert row.cu_seqlens.tolist() == cuts and row.cu_seqlens.dtype == np.int32


def test_epochs_reshuffle(shards):
    src = ShardSource(shards, seed=4)
    first = [src.doc(k).tolist() for k in range(21)]
    second = [src.doc(k).tolist() for k in range(21, 42)]
    assert sorted(map(tuple, first)) == sorted(map(tuple, second)) and first != second
    assert src.position(45) == (2, 3)


def test_resume_mid_document_and_mix(shards, tokenizer):
    def packer():
        synth = SyntheticSource(tokenizer, tasks=["passkey", "common_words"], min_len=60, max_len=200, seed=2)
        return Packer(DataMix([ShardSource(shards, seed=1), synth], [1.0, 2.0], seed=9), seq_len=40)

    a = packer()
    straight = [a.next_row() for _ in range(30)]
    b = packer()
    for _ in range(13):
        b.next_row()
    state = json.loads(json.dumps(b.state_dict()))
    assert state["offset"] > 0 or state["doc_index"] > 0
    c = packer()
    c.load_state_dict(state)
    for want in straight[13:]:
        got = c.next_row()
        assert np.array_equal(got.input_ids, want.input_ids) and np.array_equal(got.labels, want.labels)
        assert np.array_equal(got.cu_seqlens, want.cu_seqlens)
    mix = DataMix([None, None], [1.0, 3.0], seed=0)
    picks = [mix.source_of(i) for i in range(4000)]
    assert 0.7 < np.mean(picks) < 0.8
    with pytest.raises(ValueError, match="seq_len"):
        c.load_state_dict({**state, "seq_len": 41})


def test_collate_and_rank_slice(shards):
    p = Packer(DataMix([ShardSource(shards)]), seq_len=32)
    rows = p.rows(4)
    ids, labels, cu = collate(rows)
    assert ids.shape == (1, 128) and labels.shape == (1, 128)
    assert cu[0] == 0 and cu[-1] == 128 and cu.dtype.is_floating_point is False
    assert set(range(0, 129, 32)) <= set(cu.tolist())
    assert [r.input_ids[0] for r in rank_slice(rows, 1, 2)] == [rows[2].input_ids[0], rows[3].input_ids[0]]
    with pytest.raises(ValueError):
        rank_slice(rows, 0, 3)


def test_pad_packing_keeps_documents_whole(shards):
    docs = _stream(ShardSource(shards, seed=2), 40)
    p = Packer(DataMix([ShardSource(shards, seed=2)], seed=0), seq_len=64, pack="pad", pad_id=0)
    seen = []
    for _ in range(10):
        row = p.next_row()
        cu = row.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == 64
        for a, b in zip(cu[:-1], cu[1:]):
            seg = row.input_ids[a:b].tolist()
            if row.labels[a:b - 1].tolist() == [IGNORE] * (b - a - 1) and set(seg) == {0}:
                continue  # the padding segment: never a target
            seen.append(seg)
            assert row.labels[a:b - 1].tolist() == seg[1:] and row.labels[b - 1] == IGNORE
    # every document of the stream appears whole and in order (all these documents fit in a row)
    assert len(seen) >= 10
    assert all(len(d) <= 64 for d in docs[: len(seen)])
    assert seen == [d.tolist() for d in docs[: len(seen)]]


def test_pad_packing_splits_only_overlong_documents(shards):
    docs = _stream(ShardSource(shards, seed=3), 6)
    p = Packer(DataMix([ShardSource(shards, seed=3)], seed=0), seq_len=8, pack="pad")
    row = p.next_row()  # every document is longer than 8 tokens: rows are its consecutive pieces
    assert row.input_ids.tolist() == docs[0][:8].tolist()
    assert row.labels[-1] == docs[0][8]


def test_answer_only_labels(tokenizer):
    src = SyntheticSource(tokenizer, tasks=["passkey", "niah_multikey"], min_len=150, max_len=300, seed=3,
                          loss="answer")
    p = Packer(DataMix([src], seed=0), seq_len=300, pack="pad")
    for _ in range(4):
        row = p.next_row()
        lab = row.labels
        (idx,) = np.nonzero(lab != IGNORE)
        assert len(idx) > 0
        # the targets are the answer (digits and a full stop) plus EOS, nothing from the prompt
        assert lab[idx[-1]] == tokenizer.eos_token_id
        targets = tokenizer.decode(lab[idx[:-1]].tolist())
        assert targets.replace(".", "").strip().isdigit(), targets
    full = SyntheticSource(tokenizer, tasks=["passkey", "niah_multikey"], min_len=150, max_len=300, seed=3)
    ids, start = src.make(0)
    assert ids.tolist() == full.make(0).tolist() and 0 < start < len(ids)


def test_prompt_labels_add_a_share_of_the_prompt(tokenizer):
    kw = dict(tasks=["common_words"], min_len=300, max_len=600, seed=4, loss="answer")
    answer_only, some = SyntheticSource(tokenizer, **kw), SyntheticSource(tokenizer, prompt_labels=0.25, **kw)
    for k in range(3):
        ids, start = answer_only.make(k)
        ids2, flags = some.make(k)
        assert ids2.tolist() == ids.tolist() and flags.dtype == bool and len(flags) == len(ids)
        assert flags[start:].all() and not flags[0]
        share = flags[1:start].mean()  # a quarter of the prompt, give or take the coin's spread
        assert 0.15 < share < 0.35, share
        assert some.make(k)[1].tolist() == flags.tolist()  # the same draw gives the same targets
    # packed: each flagged token is the label of the token before it, and nothing else is labelled
    ids, flags = some.make(0)
    row = Packer(DataMix([some], seed=0), seq_len=len(ids) + 5, pack="pad").next_row()
    want = np.full(len(row.labels), IGNORE)
    want[:len(ids) - 1][flags[1:]] = ids[1:][flags[1:]]
    assert row.labels.tolist() == want.tolist()
    # a split document keeps its flags across the row boundary
    p = Packer(DataMix([some], seed=0), seq_len=64, pack="split")
    labels = np.concatenate([p.next_row().labels for _ in range(-(-len(ids) // 64))])[:len(ids) - 1]
    assert labels.tolist() == want[:len(ids) - 1].tolist()
    for bad in (dict(prompt_labels=1.5, loss="answer"), dict(prompt_labels=0.1, loss="all")):
        with pytest.raises(ValueError, match="prompt_labels"):
            SyntheticSource(tokenizer, tasks=["passkey"], **bad)


def test_synthetic_workers_give_the_same_documents(tokenizer):
    kw = dict(tasks=["passkey", "common_words"], min_len=100, max_len=400, seed=5, loss="answer")
    plain = SyntheticSource(tokenizer, **kw)
    pooled = SyntheticSource(tokenizer, workers=2, **kw)
    for k in list(range(0, 20)) + [40, 41]:
        a, b = plain.doc(k), pooled.doc(k)
        assert a[0].tolist() == b[0].tolist() and a[1] == b[1]


def test_bad_loss_and_pack_values(tokenizer, shards):
    with pytest.raises(ValueError, match="loss"):
        SyntheticSource(tokenizer, loss="prompt")
    with pytest.raises(ValueError, match="pack"):
        Packer(DataMix([ShardSource(shards)]), seq_len=16, pack="fill")
