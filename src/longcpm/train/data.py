"""Training data: token shards on disk, document sources, and a packer that cuts the document stream into rows.

Shards: `tokenize_files` writes uint32 token files (read back with numpy memmap), an int64 `.npy` of document
offsets per shard, and `index.json` listing them. Every document is BOS + text + EOS (the real tokenizer).

Stream: a `DataMix` draws document i from one of its sources by a seeded per-document coin, so the stream is a
pure function of (seed, sources, weights). `Packer` cuts it into rows of seq_len tokens; documents are split at
row boundaries and the continuation starts the next row at position 0. Labels are the next token inside the same
document and -100 across a document boundary. Its whole position is a few integers (`state_dict`), so a resumed
run reads exactly the rows an uninterrupted run would have read. Every rank runs the same stream and keeps its
slice of each global batch (`rank_slice`), so the global token count needs no communication.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .synthetic import EVAL_SEED_START, TASKS, TRAIN_TASKS, ChunkEncoder, generate

IGNORE = -100
INDEX = "index.json"
# A document: its tokens (all targets), (tokens, first target index), or (tokens, per-token target flags)
Doc = np.ndarray | tuple[np.ndarray, int] | tuple[np.ndarray, np.ndarray]


def _split_doc(d: Doc) -> tuple[np.ndarray, int | np.ndarray]:
    return d if isinstance(d, tuple) else (d, 0)


def _targets(start: int | np.ndarray, off: int, n: int) -> np.ndarray:
    """Target flags of tokens [off, off + n) of a document whose targets are `start` (see Doc)."""
    if isinstance(start, np.ndarray):
        return start[off: off + n]
    return np.arange(off, off + n) >= start


def _docs_of(path: Path, field: str) -> Iterable[str]:
    """A .jsonl file gives one document per line (its `field`); any other file is one document."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                    raise ValueError(f"{path}:{n}: no string field {field!r}")
                yield rec[field]
    else:
        yield path.read_text(encoding="utf-8")


def tokenize_files(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, tokenizer, *, field: str = "text",
                   shard_tokens: int = 1 << 28, eos_id: int | None = None) -> Path:
    """Tokenize text / JSONL files into out_dir (written to a temp folder, then renamed into place)."""
    out = Path(out_dir)
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[dict] = []
    offsets: list[int] = [0]
    fh = None

    def close_shard():
        nonlocal fh, offsets
        if fh is None:
            return
        fh.close()
        i = len(shards)
        np.save(tmp / f"docs_{i:05d}.npy", np.asarray(offsets, dtype=np.int64))
        shards.append({"tokens": f"tokens_{i:05d}.bin", "docs": f"docs_{i:05d}.npy", "num_tokens": offsets[-1],
                       "num_docs": len(offsets) - 1})
        fh, offsets = None, [0]

    for path in map(Path, inputs):
        for text in _docs_of(path, field):
            ids = tokenizer.encode(text)
            if not ids or ids[-1] != eos:
                ids.append(eos)
            if fh is None:
                fh = open(tmp / f"tokens_{len(shards):05d}.bin", "wb")  # noqa: SIM115 - closed in close_shard
            fh.write(np.asarray(ids, dtype=np.uint32).tobytes())
            offsets.append(offsets[-1] + len(ids))
            if offsets[-1] >= shard_tokens:
                close_shard()
    close_shard()
    index = {"version": 1, "dtype": "uint32", "eos_id": eos, "shards": shards,
             "num_docs": sum(s["num_docs"] for s in shards), "num_tokens": sum(s["num_tokens"] for s in shards)}
    (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


class TokenShards:
    """Read-only view of a tokenize_files folder: document i as a uint32 array (memory-mapped, not loaded)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index_file = self.path / INDEX
        if not index_file.is_file():
            raise FileNotFoundError(f"{self.path}: no {INDEX} (write shards with longcpm.train.data.tokenize_files)")
        self.index = json.loads(index_file.read_text())
        self._tokens, self._offsets = [], []
        for s in self.index["shards"]:
            self._tokens.append(np.memmap(self.path / s["tokens"], dtype=np.uint32, mode="r", shape=(s["num_tokens"],)))
            self._offsets.append(np.load(self.path / s["docs"], mmap_mode="r"))
        self._first = np.cumsum([0] + [s["num_docs"] for s in self.index["shards"]])
        self.num_docs = int(self._first[-1])
        if self.num_docs == 0:
            raise ValueError(f"{self.path}: the shards hold no documents")

    def doc(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self._first, i, side="right")) - 1
        off = self._offsets[s]
        j = i - int(self._first[s])
        return np.asarray(self._tokens[s][int(off[j]): int(off[j + 1])])


class ShardSource:
    """Documents of a TokenShards folder in a fresh seeded permutation each epoch: draw k is document
    perm(seed, epoch)[offset] with (epoch, offset) = divmod(k, num_docs)."""

    def __init__(self, path, seed: int = 0):
        self.shards = TokenShards(path)
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def position(self, k: int) -> tuple[int, int]:
        return divmod(k, self.shards.num_docs)

    def doc(self, k: int) -> np.ndarray:
        epoch, offset = self.position(k)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.shards.num_docs))
        return self.shards.doc(int(self._perm[1][offset]))


class SyntheticSource:
    """Synthetic task documents (prompt + answer + EOS). Draw k: task and length from a per-draw coin,
    generation seed (seed·1_000_003 + k) mod EVAL_SEED_START, so training never touches the eval seed range.

    loss="answer" labels only the answer and EOS (the prompt is context, not a target); with prompt_labels p > 0
    each prompt token is also a target with probability p (a coin per token, seeded by the draw). That gives tasks
    whose answer is a statistic of the prompt a dense signal: on a common-word list the next word's distribution
    is the list's own word counts, so predicting a share of the list trains the count the answer reads, with
    hundreds of targets per document where the answer has ten. workers > 0 generates
    the next documents in that many forked processes, one batch ahead of the trainer; the documents are the same
    as with workers = 0. Lengths are fitted within 1/64 of the drawn length (`generate`'s slack) and encoded by
    a ChunkEncoder: the ids equal the tokenizer's, a few times faster."""

    def __init__(self, tokenizer, *, tasks: Sequence[str] = TASKS, weights: Sequence[float] | None = None,
                 min_len: int = 256, max_len: int = 1024, seed: int = 0, loss: str = "all", workers: int = 0,
                 prompt_labels: float = 0.0):
        if not 0 <= seed < EVAL_SEED_START:
            raise ValueError(f"synthetic training seed {seed} is outside [0, {EVAL_SEED_START}): seeds from "
                             f"{EVAL_SEED_START} on are reserved for evaluation")
        unknown = [t for t in tasks if t not in TRAIN_TASKS]
        if unknown or not tasks:
            raise ValueError(f"unknown synthetic tasks {unknown} (tasks: {', '.join(TRAIN_TASKS)})")
        if not 0 < min_len <= max_len:
            raise ValueError(f"synthetic lengths need 0 < min_len <= max_len, got {min_len}, {max_len}")
        if loss not in ("all", "answer"):
            raise ValueError(f"synthetic loss must be 'all' or 'answer', got {loss!r}")
        if not 0.0 <= prompt_labels <= 1.0 or (prompt_labels and loss != "answer"):
            raise ValueError(f"prompt_labels must be in [0, 1] and needs loss='answer', got {prompt_labels!r} "
                             f"with loss={loss!r}")
        self.prompt_labels = float(prompt_labels)
        self.tokenizer, self.tasks, self.seed = tokenizer, list(tasks), seed
        self.encoder = ChunkEncoder(tokenizer)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.tasks)
        self.min_len, self.max_len = min_len, max_len
        self.loss, self.workers = loss, workers
        self._ahead: dict[int, Doc] = {}
        self._pending: list[tuple[range, object]] = []  # generation batches in flight: (draws, AsyncResult)
        self._pool = None

    def example_seed(self, k: int) -> int:
        s = (self.seed * 1_000_003 + k) % EVAL_SEED_START
        if s >= EVAL_SEED_START:  # pragma: no cover - guarded by construction
            raise ValueError(f"seed {s} is reserved for evaluation")
        return s

    def make(self, k: int) -> Doc:
        rng = random.Random(self.seed * 7_919_000_003 + k)
        task = rng.choices(self.tasks, self.weights)[0]
        length = rng.randint(self.min_len, self.max_len)
        ex = generate(task, length, self.example_seed(k), self.encoder, allow_longer=True, slack=length // 64)
        ids = ex.token_ids(self.encoder)
        if self.loss == "all":
            return np.asarray(ids, dtype=np.uint32)
        prompt = self.encoder.encode(ex.prompt)
        start = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), len(prompt))
        if not self.prompt_labels:
            return np.asarray(ids, dtype=np.uint32), start
        flags = np.random.default_rng([self.seed, k]).random(len(ids)) < self.prompt_labels
        flags[0] = False  # the first token has nothing before it to predict from
        flags[start:] = True
        return np.asarray(ids, dtype=np.uint32), flags

    def doc(self, k: int) -> Doc:
        if self.workers <= 0:
            return self.make(k)
        if k not in self._ahead:
            self._fill(k)
        out = self._ahead.pop(k)
        for old in [j for j in self._ahead if j < k]:
            del self._ahead[old]
        return out

    def _fill(self, k: int) -> None:
        """Collect the batch holding draw k (starting it if k is not in flight), then start the next batch, so
        the workers generate while the trainer computes."""
        import multiprocessing as mp
        if self._pool is None:
            global _WORKER_SOURCE
            _WORKER_SOURCE = self  # inherited by the forked workers
            self._pool = mp.get_context("fork").Pool(self.workers)
        n = 8 * self.workers
        if not any(k in r for r, _ in self._pending):
            self._pending = [(range(k, k + n), self._pool.map_async(_make_in_worker, range(k, k + n), chunksize=2))]
        while self._pending:
            r, res = self._pending.pop(0)
            self._ahead.update(zip(r, res.get()))
            if k in r:
                break
        nxt = range(r.stop, r.stop + n)
        self._pending.append((nxt, self._pool.map_async(_make_in_worker, nxt, chunksize=2)))

    def __del__(self):
        if getattr(self, "_pool", None) is not None:
            self._pool.terminate()


_WORKER_SOURCE: SyntheticSource | None = None


def _make_in_worker(k: int) -> Doc:
    return _WORKER_SOURCE.make(k)


class DataMix:
    """The global document stream: document i comes from source j with probability weights[j]."""

    def __init__(self, sources: Sequence, weights: Sequence[float] | None = None, seed: int = 0):
        if not sources:
            raise ValueError("a data mix needs at least one source")
        self.sources, self.seed = list(sources), seed
        self.weights = list(weights) if weights is not None else [1.0] * len(self.sources)
        if len(self.weights) != len(self.sources) or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"bad source weights {self.weights}")

    def source_of(self, i: int) -> int:
        if len(self.sources) == 1:
            return 0
        return random.Random(self.seed * 1_000_000_007 + i).choices(range(len(self.sources)), self.weights)[0]


@dataclass
class Row:
    """One packed row: input_ids/labels [seq_len] int64, cu_seqlens int32 [docs + 1]."""

    input_ids: np.ndarray
    labels: np.ndarray
    cu_seqlens: np.ndarray

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids [1, T], labels [1, T], cu_seqlens int32)."""
        return (torch.from_numpy(self.input_ids)[None], torch.from_numpy(self.labels)[None],
                torch.from_numpy(self.cu_seqlens))


class Packer:
    """Cuts a DataMix stream into rows. Position: document i, the offset into it, and the per-source draw counts
    before document i. pack="split" fills every row to the brim, splitting documents at row ends; pack="pad"
    starts every document at a row start unless it is longer than a row, and pads the rest of the row (its own
    segment in cu_seqlens, no labels), so a task document always keeps its prompt."""

    def __init__(self, mix: DataMix, seq_len: int, pack: str = "split", pad_id: int = 0):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if pack not in ("split", "pad"):
            raise ValueError(f"pack must be 'split' or 'pad', got {pack!r}")
        self.mix, self.seq_len, self.pack, self.pad_id = mix, seq_len, pack, pad_id
        self.doc_index, self.offset = 0, 0
        self.counts = [0] * len(mix.sources)
        self._cache: dict[int, tuple[int, np.ndarray, int]] = {}

    def _doc(self, i: int, counts: list[int]) -> tuple[int, np.ndarray, int]:
        """(source, tokens, first target index) of document i; `counts` are the per-source draws before it."""
        if i not in self._cache:
            j = self.mix.source_of(i)
            self._cache[i] = (j, *_split_doc(self.mix.sources[j].doc(counts[j])))
            if len(self._cache) > 4:
                del self._cache[min(self._cache)]
        return self._cache[i]

    def _read(self, n: int, i: int, off: int, counts: list[int], whole: bool = False):
        """Up to n tokens from (document i, offset off): (tokens, document ids, target flags, new i, new off);
        `counts` (draws before document i) is advanced in place past every document finished. whole: stop
        before a document that would not fit in full (unless nothing has been read yet)."""
        toks, segs, tgt = [], [], []
        while n > 0:
            j, d, start = self._doc(i, counts)
            if whole and toks and len(d) - off > n:
                break
            take = d[off: off + n]
            toks.append(take)
            segs.append(np.full(len(take), i, dtype=np.int64))
            tgt.append(_targets(start, off, len(take)))
            n -= len(take)
            off += len(take)
            if off >= len(d):
                i, off = i + 1, 0
                counts[j] += 1
        return np.concatenate(toks).astype(np.int64), np.concatenate(segs), np.concatenate(tgt), i, off

    def next_row(self) -> Row:
        L = self.seq_len
        counts = list(self.counts)
        ids, segs, tgt, i, off = self._read(L, self.doc_index, self.offset, counts, whole=self.pack == "pad")
        if len(ids) < L:  # padding: its own segment, never a target
            pad = L - len(ids)
            ids = np.concatenate([ids, np.full(pad, self.pad_id, dtype=np.int64)])
            segs = np.concatenate([segs, np.full(pad, -1, dtype=np.int64)])
            tgt = np.concatenate([tgt, np.zeros(pad, dtype=bool)])
        labels = np.full(L, IGNORE, dtype=np.int64)
        keep = (segs[1:] == segs[:-1]) & tgt[1:]
        labels[:-1][keep] = ids[1:][keep]
        if off > 0:  # the last token's label is the next stream token when the document continues
            peek, _, ptgt, _, _ = self._read(1, i, off, list(counts))
            if ptgt[0]:
                labels[-1] = peek[0]
        cuts = np.flatnonzero(segs[1:] != segs[:-1]) + 1
        cu = np.concatenate([[0], cuts, [L]]).astype(np.int32)
        self.doc_index, self.offset, self.counts = i, off, counts
        return Row(ids, labels, cu)

    def rows(self, n: int) -> list[Row]:
        return [self.next_row() for _ in range(n)]

    def state_dict(self) -> dict:
        return {"doc_index": self.doc_index, "offset": self.offset, "counts": list(self.counts),
                "seq_len": self.seq_len, "seed": self.mix.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seq_len", self.seq_len) != self.seq_len:
            raise ValueError(f"data position was saved with seq_len {state['seq_len']}, not {self.seq_len}")
        self.doc_index, self.offset = int(state["doc_index"]), int(state["offset"])
        self.counts = [int(c) for c in state["counts"]]
        self._cache.clear()


def collate(rows: Sequence[Row], device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows packed end to end into one B = 1 sequence: (input_ids [1, R·L], labels [1, R·L], cu_seqlens int32).
    No document crosses a row, so this is the same computation as R separate rows."""
    ids = np.concatenate([r.input_ids for r in rows])
    labels = np.concatenate([r.labels for r in rows])
    cus, base = [np.zeros(1, dtype=np.int32)], 0
    for r in rows:
        cus.append(r.cu_seqlens[1:] + base)
        base += len(r.input_ids)
    cu = np.concatenate(cus).astype(np.int32)
    t = (torch.from_numpy(ids)[None], torch.from_numpy(labels)[None], torch.from_numpy(cu))
    return tuple(x.to(device) for x in t) if device is not None else t


def rank_slice(rows: Sequence[Row], rank: int, world: int) -> list[Row]:
    """This rank's contiguous share of a global batch (len(rows) must divide by world)."""
    if len(rows) % world:
        raise ValueError(f"{len(rows)} rows do not split over {world} ranks")
    n = len(rows) // world
    return list(rows[rank * n: (rank + 1) * n])
