#!/usr/bin/env bash
# Issue 6, one H200 call: optionally train the stages in STAGES (as quality_stages_h200.sh), then run several
# `longcpm eval`s of the model side by side on the one GPU. Each eval is one greedy stream that leaves the GPU mostly
# idle: five 16K-32K x 20-seed runs take about 90 s together against about 60 s each alone. Their prefill and decode
# times share the GPU, so quote accuracy from them and times from a run of its own.
#   RUNS    ';'-separated "name eval-args...", e.g. "ds --attention dense; sp --attention sparse --window 2048"
#   COMMON  eval args every run gets (default: all tasks, 16K and 32K, 20 seeds, one-call prefill)
#   ALONE   runs in the same form, one after another once the side-by-side ones are done: for the times
#   AFTER   a command run last, alone, with the model in $MODEL (e.g. a GPU `longcpm demo`); its output goes to after.log
#   MODEL   the model to score when STAGES is empty (default: the packaged needle-27m)
# Each run's <name>.json and log, and the training curves, come back in $OUT/results.tar (the device returns at most
# 8 files, and a trained model takes 4 of them as $OUT/model.tar.part-*).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out}; mkdir -p "$OUT"
W=/tmp/parallel-results; rm -rf "$W"; mkdir -p "$W"
model=${MODEL:-needle-27m}
if [ -n "${STAGES:-}" ]; then
  env PART=train STAGES="$STAGES" FROM="${FROM:-src/longcpm/assets/needle-27m}" FRESH=1 bash benchmarks/quality_h200.sh \
    2>&1 | tee "$W/train.log"
  cp "$OUT"/metrics-*.jsonl "$W"/ 2>/dev/null; rm -f "$OUT"/metrics-*.jsonl "$OUT"/calib-*.jsonl
  model=/tmp/export/model
fi
COMMON=${COMMON:---tasks all --lengths 16K,32K --seeds 20 --max-num-batched-tokens 65536}  # later args win
one() {  # one eval: "name args..."
  local a; read -ra a <<< "$1"; [ ${#a[@]} -eq 0 ] && return
  # shellcheck disable=SC2086
  timeout "${EVAL_TIMEOUT:-500}" python3 -m longcpm.cli.main eval --model "$model" $COMMON --quiet "${a[@]:1}" \
    --out "$W/${a[0]}.json" >"$W/${a[0]}.log" 2>&1
  echo "${a[0]}: exit $? at ${SECONDS}s"
}
IFS=';' read -ra runs <<< "${RUNS:-}"
for r in "${runs[@]}"; do one "$r" & done
wait
IFS=';' read -ra alone <<< "${ALONE:-}"
for r in "${alone[@]}"; do one "$r"; done
if [ -n "${AFTER:-}" ]; then
  MODEL=$model timeout "${EVAL_TIMEOUT:-500}" bash -c "$AFTER" >"$W/after.log" 2>&1; echo "after: exit $? at ${SECONDS}s"
  tail -20 "$W/after.log"
fi
tar -C "$W" -cf "$OUT/results.tar" .
ls -la "$OUT"
