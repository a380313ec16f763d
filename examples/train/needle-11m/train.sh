#!/usr/bin/env bash
# Train needle-11m from scratch: stage 1 dense on documents of <= 1K tokens, stage 2 InfLLM-V2 sparse on documents
# of 4K-32K tokens, then write the packaged bf16 copy. Run from the repository root on a CUDA machine (one H200:
# about 5 + 1.5 minutes). STAGES="2" continues from stage 1's final folder; extra arguments go to every stage
# (e.g. --set run.progress=false).
set -euo pipefail
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
dir=examples/train/needle-11m
for s in ${STAGES:-1 2}; do
  python3 -m longcpm.train "$dir"/"$s"_*.toml "$@"
done
if [ -d runs/needle-11m/2_long_sparse/final ] && [ -z "${NO_EXPORT:-}" ]; then
  python3 "$dir"/export.py runs/needle-11m/2_long_sparse/final src/longcpm/assets/needle-11m --dtype bfloat16
fi
