#!/usr/bin/env bash
# Train needle-27m from scratch: stage 1 dense on documents of <= 2K tokens, then sparse stages (30% of steps dense) on
# documents of up to 32K tokens alternating with short-document stages that teach one skill each (5: key matching,
# 7 and 9: tracking and counting; see each stage file), sparse stages at top-k 64 (11-16; 13-15 add short documents
# whose variable names train every capital-letter piece of the tokenizer), common words answered in last-appearance
# order from short dense lists up to long sparse ones (17-24), the 2,048-token window (25), then write the packaged
# bf16 copy. Run from the repository root on a CUDA machine. STAGES="2" continues from stage 1's final folder; extra
# arguments go to every stage (e.g. --set run.steps=1000 --set run.progress=false). The step counts of the shipped
# model are in docs/quality.md (stages 17-25: in their files).
set -euo pipefail
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
dir=examples/train/needle-27m
for s in ${STAGES:-1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25}; do
  python3 -m longcpm.train "$dir"/"$s"_*.toml "$@"
done
if [ -d runs/needle-27m/25_window_2048/final ] && [ -z "${NO_EXPORT:-}" ]; then
  python3 examples/train/export.py runs/needle-27m/25_window_2048/final src/longcpm/assets/needle-27m --dtype bfloat16
fi
