"""CPU checks of the built-in needle-27m behind figures in docs/quality.md:

  multikey_probe   held-out niah_multikey examples (600 tokens): which needle's number the model rates the most
                   likely reply (the queried key's, the first in the document, the last), dense, fp32
  answer_logprobs  teacher-forced log-probability of each answer token (and the model's own top token) for one
                   held-out example of common words (400, 2600 tokens) and variable tracking (600), dense, fp32
  context_words    at the common-word answer position: mean log-probability of the answer words, the other list
                   words in the context, and list words not in it (does the model copy? count?)
  demo             `longcpm demo` times (prefill + generation, after its warm-up) and correctness at 8K and 16K,
                   dense and sparse, as the demo runs them

Writes benchmarks/results/needle-27m-cpu-checks.json. Run on an otherwise idle machine (timings).

    python benchmarks/needle_cpu_checks.py [--seeds 40] [--lengths 8192,16384] [--only context_words,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from longcpm import load_model  # noqa: E402
from longcpm.cli.main import _demo_run  # noqa: E402
from longcpm.config import ModelConfig  # noqa: E402
from longcpm.eval.scoring import score  # noqa: E402
from longcpm.models.builtin import builtin_path  # noqa: E402
from longcpm.text import load_tokenizer  # noqa: E402
from longcpm.train.synthetic import EVAL_SEED_START, generate, word_list  # noqa: E402

NEEDLE = re.compile(r"for ([a-z]+-[a-z]+) is: (\d+)\.")


def multikey_probe(folder: Path, seeds: int) -> dict:
    model = load_model(folder, device="cpu", dtype=torch.float32)
    tok = load_tokenizer(folder)
    counts = {"queried": 0, "first_in_document": 0, "last_in_document": 0}
    for seed in range(EVAL_SEED_START + 100, EVAL_SEED_START + 100 + seeds):
        ex = generate("niah_multikey", 600, seed, tok)
        needles = NEEDLE.findall(ex.prompt)  # (key, number) in document order
        base = tok.encode(ex.prompt)

        def logprob(number: str, prompt: str = ex.prompt, base: list[int] = base) -> float:
            # the whole reply " <number>" scored after the prompt, teacher-forced
            ids = tok.encode(prompt + " " + number)[len(base):]
            with torch.no_grad():
                logp = model(torch.tensor([base + ids]))[0, len(base) - 1: -1].log_softmax(-1)
            return sum(logp[i, t].item() for i, t in enumerate(ids))
        scores = [logprob(v) for _, v in needles]
        pick = needles[max(range(len(needles)), key=scores.__getitem__)]
        counts["queried"] += pick[1] == ex.answers[0]
        counts["first_in_document"] += pick == needles[0]
        counts["last_in_document"] += pick == needles[-1]
    return {"length": 600, "seeds": seeds, "picked": counts,
            "rule": "the needle whose whole number has the highest log-probability as the reply"}


def answer_logprobs(folder: Path, cases=(("common_words", 400), ("common_words", 2600),
                                          ("variable_tracking", 600))) -> list[dict]:
    model = load_model(folder, device="cpu", dtype=torch.float32)
    tok = load_tokenizer(folder)
    out = []
    for task, length in cases:
        ex = generate(task, length, EVAL_SEED_START + 3, tok)
        base, full = tok.encode(ex.prompt), ex.token_ids(tok)
        with torch.no_grad():
            logp = model(torch.tensor([full]))[0].log_softmax(-1)
        tokens = [{"token": tok.convert_ids_to_tokens(full[i]), "logprob": round(logp[i - 1, full[i]].item(), 3),
                   "top": tok.convert_ids_to_tokens(int(logp[i - 1].argmax()))} for i in range(len(base), len(full))]
        out.append({"task": task, "length": length, "seed": EVAL_SEED_START + 3, "tokens": tokens})
    return out


def demo(folder: Path, lengths: list[int]) -> list[dict]:
    config = ModelConfig.from_file(folder / "config.json")
    tok = load_tokenizer(folder)
    out = []
    for length in lengths:
        ex = generate("passkey", length, EVAL_SEED_START, tok)
        ids = tok.encode(ex.prompt)
        max_tokens = len(tok.encode(ex.answer, add_special_tokens=False)) + 4
        for mode in ("dense", "sparse"):
            reply, seconds = _demo_run(folder, mode, config.sparse_config, ids, max_tokens, torch.device("cpu"), "auto")
            out.append({"length": length, "prompt_tokens": len(ids), "attention": mode, "seconds": round(seconds, 2),
                        "correct": score("passkey", reply, ex.answers)[0]})
            print(out[-1], flush=True)
    return out


def context_words(folder: Path) -> list[dict]:
    """At the common-word answer position: the mean log-probability of the answer words, of the other list words in
    the context, and of 2,000 list words not in it. Counting puts the first above the second; copying puts both
    above the third."""
    model = load_model(folder, device="cpu", dtype=torch.float32)
    tok = load_tokenizer(folder)
    ids = {w: tok.encode(" " + w, add_special_tokens=False)[0] for w in word_list()}
    out = []
    for task, length in (("common_words", 600), ("common_words", 3000), ("cw_top", 800)):
        ex = generate(task, length, EVAL_SEED_START + 5, tok, allow_longer=True)
        with torch.no_grad():
            logp = model(torch.tensor([tok.encode(ex.prompt)]))[0, -1].log_softmax(-1)
        listed = set(ex.prompt.split("\n")[1].split()[1::2])
        common = set(ex.answers)
        absent = [w for w in word_list() if w not in listed][:2000]

        def mean(words, logp=logp) -> float:
            return round(sum(logp[ids[w]].item() for w in words) / len(words), 3)
        out.append({"task": task, "length": length, "seed": EVAL_SEED_START + 5, "answer_words": mean(common),
                    "other_words_in_context": mean(listed - common), "words_not_in_context": mean(absent),
                    "top_token": tok.convert_ids_to_tokens(int(logp.argmax()))})
    return out


def decode_consistency(folder: Path, length: int = 4096, seeds: int = 10,
                       tasks=("niah_multivalue", "variable_tracking", "common_words")) -> dict:
    """Greedy replies of the engine (the eval's path: KV cache, chunked prefill, decode) against one teacher-forced
    forward of prompt + answer, dense, fp32. The answer is the greedy reply exactly when every answer token is the
    teacher-forced argmax, so the two counts must agree; a gap would be a decode-path defect, not the model."""
    from longcpm.eval.suite import run_suite
    model = load_model(folder, device="cpu", dtype=torch.float32)
    tok = load_tokenizer(folder)
    seed_list = list(range(EVAL_SEED_START, EVAL_SEED_START + seeds))
    records = run_suite(str(folder), tasks, [length], seed_list, ["dense"], device="cpu", dtype="float32",
                        warmup=False, progress=False)
    out = {}
    for rec in records:
        forced, first_wrong = 0, []
        for seed in seed_list:
            ex = generate(rec["task"], length, seed, tok)
            base, full = tok.encode(ex.prompt), ex.token_ids(tok)
            with torch.no_grad():
                top = model(torch.tensor([full]))[0].argmax(-1)
            # the reply is scored without the final EOS: the answer text's tokens must all be the argmax
            wrong = [i - len(base) for i in range(len(base), len(full) - 1) if int(top[i - 1]) != full[i]]
            forced += not wrong
            first_wrong.append(wrong[0] if wrong else None)
        out[rec["task"]] = {"greedy_exact": sum(d["correct"] for d in rec["details"]), "teacher_forced_exact": forced,
                            "first_wrong_answer_token": first_wrong, "samples": len(seed_list)}
    return {"length": length, "attention": "dense", "dtype": "float32", "tasks": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=40)
    p.add_argument("--lengths", default="8192,16384")
    p.add_argument("--only", help="comma-separated sections to rerun, kept with the file's other sections "
                                  "(multikey_probe, answer_logprobs, context_words, demo, decode_consistency)")
    p.add_argument("--model", help="a model folder (default: the built-in needle-27m)")
    p.add_argument("--out", help="results file (default: benchmarks/results/needle-27m-cpu-checks.json)")
    a = p.parse_args()
    folder = Path(a.model) if a.model else builtin_path("needle-27m")
    path = Path(a.out) if a.out else Path(__file__).resolve().parent / "results" / "needle-27m-cpu-checks.json"
    sections = {"multikey_probe": lambda: multikey_probe(folder, a.seeds),
                "answer_logprobs": lambda: answer_logprobs(folder), "context_words": lambda: context_words(folder),
                "demo": lambda: demo(folder, [int(x) for x in a.lengths.split(",")]),
                "decode_consistency": lambda: decode_consistency(folder)}
    names = a.only.split(",") if a.only else list(sections)
    unknown = [n for n in names if n not in sections]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {', '.join(sections)}")
    doc = json.loads(path.read_text()) if a.only and path.exists() else {}
    for name in names:
        doc[name] = sections[name]()
        print(name, json.dumps(doc[name])[:600], flush=True)
    doc["metadata"] = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "model": a.model or "needle-27m",
                       "last_rerun": names}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
