"""Paired dense-vs-sparse figures of a results file: examples right in both modes / only one, the sparse/dense
ratio at lengths >= 16K up to --max-length, and its paired bootstrap 95% interval (examples resampled with
their dense and sparse outcomes together). Writes benchmarks/results/quality-paired.json.

    python benchmarks/quality_paired.py [benchmarks/results/quality.json] [--max-length 32768]
"""

import argparse
import json
import random
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("results", nargs="?", default=str(Path(__file__).parent / "results" / "quality.json"))
p.add_argument("--min-length", type=int, default=16384)
p.add_argument("--max-length", type=int, default=32768)
p.add_argument("--draws", type=int, default=4000)
a = p.parse_args()
pairs: dict[tuple, dict[str, bool]] = {}
for r in json.loads(Path(a.results).read_text())["records"]:
    if a.min_length <= r["length"] <= a.max_length and r.get("details"):
        for d in r["details"]:
            pairs.setdefault((r["task"], r["length"], d["seed"]), {})[r["attention"]] = d["correct"]
keys = sorted(k for k, v in pairs.items() if "dense" in v and "sparse" in v)
D = [pairs[k]["dense"] for k in keys]
S = [pairs[k]["sparse"] for k in keys]
rng = random.Random(0)
ratios = []
for _ in range(a.draws):
    idx = [rng.randrange(len(keys)) for _ in keys]
    ratios.append(sum(S[i] for i in idx) / max(1, sum(D[i] for i in idx)))
ratios.sort()
out = {"results": a.results, "lengths": [a.min_length, a.max_length], "examples": len(keys),
       "dense": sum(D) / len(keys), "sparse": sum(S) / len(keys), "ratio": sum(S) / sum(D),
       "both_right": sum(x and y for x, y in zip(D, S)), "dense_only": sum(x and not y for x, y in zip(D, S)),
       "sparse_only": sum(y and not x for x, y in zip(D, S)), "bootstrap_draws": a.draws, "bootstrap_seed": 0,
       "ratio_95": [ratios[int(0.025 * a.draws)], ratios[int(0.975 * a.draws)]]}
print(json.dumps(out, indent=1))
(Path(__file__).parent / "results" / "quality-paired.json").write_text(json.dumps(out, indent=1) + "\n")
