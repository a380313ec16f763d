"""The table and the results JSON: what docs/quality.md and reviews read."""

import json

import pytest

from longcpm.eval import EvalError, format_table, load_json, summary, timing, write_json
from longcpm.eval.report import REQUIRED, SCHEMA, length_label, metadata
from longcpm.train.synthetic import SUITE_VERSION


def rec(task, length, mode, acc, prefill=10.0, used=None, skipped=None):
    r = {"model": "m", "task": task, "length": length, "attention": mode, "accuracy": acc,
         "samples": 0 if skipped else 4}
    if skipped:
        return {**r, "skipped": skipped}
    details = [{"seed": 10**6 + i, "prompt_tokens": length - 10, "correct": i < acc * 4, "partial": acc,
                "reply": "x", "attention_used": used or mode, "prefill_ms": prefill + i,
                "decode_ms_per_token": 1.0} for i in range(4)]
    return {**r, "attention_used": used or mode, "details": details}


RECORDS = [rec(t, n, m, a) for t, n, m, a in [
    ("passkey", 4096, "dense", 1.0), ("passkey", 4096, "sparse", 1.0),
    ("passkey", 16384, "dense", 1.0), ("passkey", 16384, "sparse", 0.75),
    ("common_words", 4096, "dense", 0.5), ("common_words", 4096, "sparse", 0.5),
    ("common_words", 16384, "dense", 0.5), ("common_words", 16384, "sparse", 0.5),
]] + [rec("passkey", 65536, m, None, skipped="length 65536 exceeds the model's max_model_len 32768")
      for m in ("dense", "sparse")]


def test_length_labels():
    assert [length_label(n) for n in (4096, 32768, 1000)] == ["4K", "32K", "1000"]


def test_table_layout():
    text = format_table(RECORDS, {"model": "m", "seeds": [10**6, 10**6 + 1], "device": "cpu", "dtype": "float32"})
    lines = text.splitlines()
    head = next(ln for ln in lines if ln.startswith("| task"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols == ["task", "4K dense", "4K sparse", "16K dense", "16K sparse", "64K dense", "64K sparse"]
    row = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")[1:]]
           for ln in lines if ln.startswith("| ") and not ln.startswith("| task")}
    assert row["passkey"] == ["100.0", "100.0", "100.0", "75.0", "skip", "skip"]
    assert row["average"] == ["75.0", "75.0", "75.0", "62.5", "skip", "skip"]
    assert row["prefill ms (median)"][:4] == ["11.5"] * 4 and row["attention used"][1] == "sparse"
    assert "sparse/dense 0.833" in text and "dense 75.0%" in text and "sparse 62.5%" in text
    assert "skipped: length 65536 exceeds" in text and "model: m | seeds: 2 (1000000..1000001)" in text
    widths = {len(ln) for ln in lines if ln.startswith("|")}
    assert len(widths) == 1  # aligned


def test_summary_only_counts_cells_with_both_modes():
    s = summary(RECORDS + [rec("vt", 32768, "dense", 0.0)])
    assert s["cells"] == 2 and s["dense"] == 0.75 and s["sparse"] == 0.625
    assert s["ratio"] == pytest.approx(0.625 / 0.75)
    assert summary(RECORDS[:2])["ratio"] is None and "no task-length cell" in format_table(RECORDS[:2])
    assert format_table([]) == "(no results)"


def test_timing_per_length_and_mode():
    t = timing(RECORDS)
    assert [(x["length"], x["attention"]) for x in t] == [(4096, "dense"), (4096, "sparse"), (16384, "dense"),
                                                          (16384, "sparse")]
    assert t[0]["samples"] == 8 and t[0]["prefill_ms"] == 11.5 and t[0]["prompt_tokens"] == 4086
    mixed = timing([rec("passkey", 8192, "auto", 1.0, used="dense"), rec("vt", 8192, "auto", 1.0, used="sparse")])
    assert mixed[0]["attention_used"] == "mixed"


def test_json_roundtrip(tmp_path):
    meta = metadata("m", {"config": {"hidden_size": 8}, "sparse_config": None, "device": "cpu"}, tasks=["passkey"],
                    lengths=[4096], seeds=[10**6], attention_modes=["dense", "sparse"], max_new_tokens=None)
    assert {"versions", "seeds", "scoring", "config", "sparse_config", "model"} <= set(meta)
    assert meta["suite"] == SUITE_VERSION >= 2  # results files say which generator made their examples
    path = write_json(tmp_path / "sub" / "r.json", RECORDS, meta)
    doc = json.loads(path.read_text())
    assert doc["schema"] == SCHEMA and doc["records"] == RECORDS and doc["metadata"]["seeds"] == [10**6]
    assert doc["timing"] == timing(RECORDS) and doc["summary"]["cells"] == 2
    assert all(set(REQUIRED) <= set(r) for r in doc["records"])
    assert load_json(path) == doc
    assert not list(tmp_path.glob("sub/*.tmp"))


@pytest.mark.parametrize("content", ["not json", "[]", '{"records": [{"task": "passkey"}]}'])
def test_load_json_refuses_other_files(tmp_path, content):
    p = tmp_path / "x.json"
    p.write_text(content)
    with pytest.raises(EvalError):
        load_json(p)
    with pytest.raises(EvalError, match="cannot read"):
        load_json(tmp_path / "missing.json")


def _meta(modes):
    return {"model": "m", "config": {"hidden_size": 8}, "sparse_config": None, "dtype": "float32", "suite": 2,
            "tasks": ["passkey", "common_words"], "lengths": [4096, 16384], "seeds": [10**6], "max_new_tokens": None,
            "attention_modes": modes, "device": "cpu", "created": "t"}


def test_merge_joins_one_run_per_mode(tmp_path):
    """Dense and sparse run in separate processes give one table: same records, the table's order, summary."""
    from longcpm.eval.report import merge
    a = write_json(tmp_path / "d.json", [r for r in RECORDS[:8] if r["attention"] == "dense"], _meta(["dense"]))
    b = write_json(tmp_path / "s.json", [r for r in RECORDS[:8] if r["attention"] == "sparse"], _meta(["sparse"]))
    records, meta = merge([b, a])
    assert meta["attention_modes"] == ["sparse", "dense"] and len(meta["merged_from"]) == 2
    assert sorted(map(json.dumps, records)) == sorted(map(json.dumps, RECORDS[:8]))
    assert [(r["length"], r["task"]) for r in records] == sorted(((r["length"], r["task"]) for r in records),
                                                                 key=lambda x: (x[0], x[1] != "passkey"))
    assert summary(records) == summary(RECORDS[:8])


def test_merge_refuses_other_experiments_and_duplicate_cells(tmp_path):
    from longcpm.eval.report import merge
    dense = [r for r in RECORDS[:8] if r["attention"] == "dense"]
    a = write_json(tmp_path / "a.json", dense, _meta(["dense"]))
    other = write_json(tmp_path / "b.json", dense, {**_meta(["dense"]), "tasks": ["passkey"]})
    with pytest.raises(EvalError, match="tasks"):
        merge([a, other])
    again = write_json(tmp_path / "c.json", dense[:1], _meta(["dense"]))
    with pytest.raises(EvalError, match="both hold passkey at 4096 .dense. for seed 1000000"):
        merge([a, again])
    skipped = write_json(tmp_path / "e.json", [rec("passkey", 4096, "dense", None, skipped="too long")],
                         _meta(["dense"]))
    with pytest.raises(EvalError, match="no examples to pool"):
        merge([a, skipped])
    with pytest.raises(EvalError, match="at least two"):
        merge([a])


def test_cli_merge_needs_out(tmp_path, capsys):
    from longcpm.cli.main import main
    a = write_json(tmp_path / "d.json", [r for r in RECORDS[:8] if r["attention"] == "dense"], _meta(["dense"]))
    b = write_json(tmp_path / "s.json", [r for r in RECORDS[:8] if r["attention"] == "sparse"], _meta(["sparse"]))
    assert main(["eval", "--merge", str(a), str(b)]) != 0
    assert "--out" in capsys.readouterr().err
    assert main(["eval", "--merge", str(a), str(b), "--out", str(tmp_path / "q.json")]) == 0
    assert load_json(tmp_path / "q.json")["summary"] == summary(RECORDS[:8])


def _reseed(records, start):
    return [{**r, "details": [{**d, "seed": start + i} for i, d in enumerate(r["details"])]} for r in records]


def test_merge_pools_seed_ranges_and_lengths(tmp_path):
    """Runs over other seeds of the same cells pool their examples; runs over other lengths add columns."""
    from longcpm.eval.report import merge
    cells = [r for r in RECORDS[:8] if r["length"] == 16384]
    a = write_json(tmp_path / "a.json", cells, {**_meta(["dense", "sparse"]), "lengths": [16384],
                                               "seeds": list(range(10**6, 10**6 + 4))})
    more = [rec(r["task"], 16384, r["attention"], 0.0) for r in cells]
    b = write_json(tmp_path / "b.json", _reseed(more, 10**6 + 4),
                   {**_meta(["dense", "sparse"]), "lengths": [16384], "seeds": list(range(10**6 + 4, 10**6 + 8))})
    short = [r for r in RECORDS[:8] if r["length"] == 4096]
    c = write_json(tmp_path / "c.json", short, {**_meta(["dense", "sparse"]), "lengths": [4096]})
    records, meta = merge([a, b, c])
    assert meta["lengths"] == [4096, 16384] and meta["seeds"] == list(range(10**6, 10**6 + 8))
    assert [m["seeds"] for m in meta["merged_from"]] == [[10**6, 10**6 + 3], [10**6 + 4, 10**6 + 7], [10**6, 10**6]]
    pooled = {(r["task"], r["attention"]): r for r in records if r["length"] == 16384}
    assert all(r["samples"] == 8 for r in pooled.values())
    assert [d["seed"] for d in pooled["passkey", "sparse"]["details"]] == list(range(10**6, 10**6 + 8))
    assert pooled["passkey", "dense"]["accuracy"] == 0.5 and pooled["passkey", "sparse"]["accuracy"] == 0.375
    assert pooled["passkey", "dense"]["correct"] == 4
    assert [r["length"] for r in records] == [4096] * 4 + [16384] * 4  # the table's order
    table = format_table(records, meta)
    row = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")[1:]]
           for ln in table.splitlines() if ln.startswith("| ")}
    assert row["examples per task"] == ["4", "4", "8", "8"]


def test_cli_merge_takes_timing_from_another_run(tmp_path, capsys):
    from longcpm.cli.main import main
    d = write_json(tmp_path / "d.json", [r for r in RECORDS[:8] if r["attention"] == "dense"], _meta(["dense"]))
    s = write_json(tmp_path / "s.json", [r for r in RECORDS[:8] if r["attention"] == "sparse"], _meta(["sparse"]))
    fast = [rec(r["task"], r["length"], r["attention"], r["accuracy"], prefill=1.0) for r in RECORDS[:8]]
    t = write_json(tmp_path / "t.json", fast, {**_meta(["dense", "sparse"]), "seeds": [7 * 10**6]})
    out = tmp_path / "q.json"
    assert main(["eval", "--merge", str(d), str(s), "--timing-from", str(t), "--out", str(out)]) == 0
    doc = load_json(out)
    assert doc["timing"] == timing(fast) and doc["timing"] != timing(RECORDS[:8])
    assert doc["metadata"]["timing_from"]["file"] == str(t) and doc["metadata"]["timing_from"]["seeds"] == [7 * 10**6] * 2
    assert "| prefill ms (median) |" in capsys.readouterr().out
    other = write_json(tmp_path / "o.json", fast, {**_meta(["dense"]), "config": {"hidden_size": 16}})
    assert main(["eval", "--merge", str(d), str(s), "--timing-from", str(other), "--out", str(out)]) != 0
    assert "differs from the merged results in config" in capsys.readouterr().err
    assert main(["eval", "--show", str(out), "--timing-from", str(t)]) != 0
    assert "goes with --merge" in capsys.readouterr().err
    assert main(["eval", "--show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "| prefill ms (median) |      2.5 |" in shown  # the file's timing rows, not the merged runs' 11.5
