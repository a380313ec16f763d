#!/usr/bin/env bash
# Issue 6, one H200 call. Side by side: (1) the packaged needle-27m scored at LENGTHS with SEEDS held-out seeds, dense
# and sparse at top-k 16, 32 and 64 (four eval processes at once plus the trainer, so their prefill times are not
# clean: the table's times come from a run alone), and (2) STAGE (default 11, examples/train/needle-27m/11_*.toml)
# trained for BUDGET seconds from the packaged model. Then (3) that model scored dense and sparse at top-k 64.
# SWEEP=0 skips (1). The JSONs and logs come back as $OUT/results.tar, the model as $OUT/model.tar.part-* (see
# quality_h200.sh). Stage 11 ran as x18 from the stage-10 package: a sweep with it (BUDGET=260, 424 steps: the evals
# slowed the calibration), then SWEEP=0 BUDGET=390 (2,191 steps), the shipped weights.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out}; mkdir -p "$OUT"
W=/tmp/topk-results; rm -rf "$W"; mkdir -p "$W"
LENGTHS=${LENGTHS:-16K,32K,64K}; SEEDS=${SEEDS:-20}
asset=src/longcpm/assets/needle-27m
ev() {  # name model attention [extra eval args]
  local name=$1 model=$2 mode=$3; shift 3
  timeout "${EVAL_TIMEOUT:-400}" python3 -m longcpm.cli.main eval --model "$model" --tasks all --lengths "$LENGTHS" \
    --seeds "$SEEDS" --attention "$mode" --out "$W/$name.json" "$@" >"$W/$name.log" 2>&1
  echo "$name: exit $? at ${SECONDS}s"; tail -3 "$W/$name.log"
}
if [ "${SWEEP:-1}" = 1 ]; then  # SWEEP=0: the stage alone (a clean calibration and training rate)
  ev shipped-dense $asset dense &
  for k in 16 32 64; do ev shipped-sparse-topk$k $asset sparse --topk $k & done
fi
st=${STAGE:-11}
env PART=train STAGES=$st FROM=$asset FRESH=1 BUDGET$st=${BUDGET:-300} bash benchmarks/quality_h200.sh 2>&1 \
  | tee "$W/train-$st.log"
wait
export EVAL_TIMEOUT=$(( ${DEADLINE:-585} - SECONDS ))  # what is left of the call's limit
ev stage$st-dense /tmp/export/model dense &
ev stage$st-sparse-topk64 /tmp/export/model sparse --topk 64 &
wait
tar -C "$W" -cf "$OUT/results.tar" .
ls -la "$OUT"
