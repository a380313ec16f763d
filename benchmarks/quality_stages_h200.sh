#!/usr/bin/env bash
# Issue 6, one H200 call: train the recipe stages in STAGES (e.g. "x19 x20"; BUDGET<stage>=seconds each, see
# quality_h200.sh) from FROM (default: the packaged needle-27m), then score the result with TASKS at LENGTHS on
# SEEDS held-out seeds (from SEED_START, default the first) in each of MODES, one mode after the other, within
# what is left of DEADLINE seconds; EVAL_ARGS go to every eval (e.g. "--max-num-batched-tokens 65536").
# The JSONs and logs come back as $OUT/results.tar, the model as $OUT/model.tar.part-* (quality_h200.sh).
# STAGES="" skips training and scores FROM.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out}; mkdir -p "$OUT"
W=/tmp/stage-results; rm -rf "$W"; mkdir -p "$W"
FROM=${FROM:-src/longcpm/assets/needle-27m}
model=$FROM
if [ -n "${STAGES:-}" ]; then
  env PART=train STAGES="$STAGES" FROM="$FROM" FRESH=1 bash benchmarks/quality_h200.sh 2>&1 | tee "$W/train.log"
  cp "$OUT"/metrics-*.jsonl "$W"/ 2>/dev/null; rm -f "$OUT"/metrics-*.jsonl "$OUT"/calib-*.jsonl
  model=/tmp/export/model
fi
for mode in ${MODES:-dense sparse}; do
  left=$(( ${DEADLINE:-580} - SECONDS - 15 ))
  [ "$left" -lt 20 ] && { echo "no time left for $mode"; break; }
  timeout "$left" python3 -m longcpm.cli.main eval --model "$model" --tasks "${TASKS:-all}" --lengths "${LENGTHS:-16K}" \
    --seeds "${SEEDS:-10}" ${SEED_START:+--seed-start "$SEED_START"} ${EVAL_ARGS:-} --attention "$mode" --out "$W/eval-$mode.json" >"$W/eval-$mode.log" 2>&1
  echo "eval $mode: exit $? at ${SECONDS}s"; grep -E "exact|skipped" "$W/eval-$mode.log" | tail -40
done
tar -C "$W" -cf "$OUT/results.tar" .
ls -la "$OUT"
