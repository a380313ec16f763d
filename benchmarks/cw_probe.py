"""Common-word probe for issue 6: is the 10-word answer hard because of the number of words or the list length?

The eval asks for 3 words below about 2.5K tokens and 10 above, so its cells mix the two. This scores the eval's
common-word builder with k fixed (3 or 10) at each length, on held-out seeds, dense. A reply counts as exact when
every answer token is the teacher-forced argmax, which is the greedy reply (needle-27m-cpu-checks.json,
decode_consistency, checks that the engine agrees); partial is the share of answer words whose first token is.

    python benchmarks/cw_probe.py --model runs/x/final --lengths 1024,2048,4096 --seeds 20 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from longcpm import load_model  # noqa: E402
from longcpm.models.builtin import builtin_path  # noqa: E402
from longcpm.text import load_tokenizer  # noqa: E402
from longcpm.train import synthetic  # noqa: E402


def word_starts(tok, answers, start: int) -> list[int]:
    """Positions of each answer word's first token in prompt + " w1, w2, ..., wk." (each word, then , or .)."""
    out, pos = [], start
    for w in answers:
        out.append(pos)
        pos += len(tok.encode(" " + w, add_special_tokens=False)) + 1
    return out


def probe(folder: Path, ks, lengths, seeds: int, device: str) -> list[dict]:
    model = load_model(folder, device=device, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    tok = load_tokenizer(folder)
    out = []
    for k in ks:
        build = synthetic.common_words_builder(k)
        for length in lengths:
            exact, words, total = 0, 0, 0
            for seed in range(synthetic.EVAL_SEED_START, synthetic.EVAL_SEED_START + seeds):
                ex = synthetic.generate(f"cw{k}", length, seed, tok, build=build)
                base, full = tok.encode(ex.prompt), ex.token_ids(tok)
                with torch.no_grad():
                    top = model(torch.tensor([full], device=device))[0].argmax(-1).tolist()
                ok = [top[i - 1] == full[i] for i in range(len(base), len(full) - 1)]
                exact += all(ok)
                starts = word_starts(tok, ex.answers, len(base))
                words += sum(top[i - 1] == full[i] for i in starts)
                total += len(starts)
            out.append({"k": k, "length": length, "samples": seeds, "exact": exact / seeds,
                        "first_token_words": round(words / total, 4)})
            print(out[-1], flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder (default: the built-in needle-27m)")
    p.add_argument("--k", default="3,10")
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out")
    a = p.parse_args()
    folder = Path(a.model) if a.model else builtin_path("needle-27m")
    rows = probe(folder, [int(x) for x in a.k.split(",")], [int(x) for x in a.lengths.split(",")], a.seeds, a.device)
    doc = {"metadata": {"model": a.model or "needle-27m", "device": torch.cuda.get_device_name() if
                        a.device.startswith("cuda") else platform.machine(), "torch": torch.__version__,
                        "suite": synthetic.SUITE_VERSION,
                        "rule": "exact: every answer token is the teacher-forced argmax (= greedy)"},
           "records": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
