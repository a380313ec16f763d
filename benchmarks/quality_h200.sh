#!/usr/bin/env bash
# Device driver for issue 6 (needle-11m): PART=calib | train | eval. Logs and results land in $OUT.
#   calib: 30 steps of each training stage (speed, memory, the sparse training path at 32K)
#   train: the stages in STAGES (default "1 2") with STEPS1/STEPS2 overriding run.steps; the last stage's
#          fp32 final folder comes back as a tar split into 15 MiB parts (device files come back <= 16 MiB each)
#   eval:  the quality table of MODEL (dense vs sparse) and the attention timing per length
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out}; mkdir -p "$OUT"
dir=examples/train/needle-11m
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
case "${PART:-calib}" in
calib)
  timeout 120 python3 benchmarks/needle_probe.py sdpa data 2>&1 | tee "$OUT/probe.jsonl"
  prev=""
  for s in ${CALIB_STAGES:-1 2 3}; do
    f=$(ls $dir/${s}_*.toml)
    extra=(); [ -n "$prev" ] && extra=(--set "model.checkpoint=$prev")
    timeout 200 python3 -m longcpm.train "$f" --set run.steps=${CALIB_STEPS:-30} --set schedule.warmup_steps=5 \
      --set run.log_every=10 --set run.progress=false --set run.out_dir=/tmp/calib/$s --set run.resume=false \
      "${extra[@]}" 2>&1 | tail -5
    cat /tmp/calib/$s/metrics.jsonl | tee -a "$OUT/calib.jsonl"
    prev=/tmp/calib/$s/final
  done ;;
train)
  # BUDGETs (seconds) turn into run.steps from a 20-step calibration of that stage; STEPSs fix them instead.
  prev=${FROM:-}
  [ -n "${FRESH:-}" ] && rm -rf runs/needle-11m  # a warm machine keeps runs/: the trainer would resume from it
  for s in ${STAGES:-1 2}; do
    f=$(ls $dir/${s}_*.toml); name=$(basename "$f" .toml)
    ck=(); [ -n "$prev" ] && ck=(--set "model.checkpoint=$prev")
    sv=STEPS$s; bv=BUDGET$s; steps=${!sv:-}
    if [ -z "$steps" ] && [ -n "${!bv:-}" ]; then
      timeout 200 python3 -m longcpm.train "$f" --set run.steps=20 --set schedule.warmup_steps=2 --set run.log_every=10 \
        --set run.progress=false --set run.out_dir=/tmp/calib/$s --set run.resume=false "${ck[@]}" >/dev/null 2>&1
      steps=$(python3 -c "import json; r=[json.loads(l) for l in open('/tmp/calib/$s/metrics.jsonl')]; \
print(int(${!bv} * r[-1]['tokens_per_s'] * r[-1]['step'] / r[-1]['tokens_seen']))")
      echo "stage $s: calibrated $(tail -1 /tmp/calib/$s/metrics.jsonl) -> $steps steps"
    fi
    python3 -m longcpm.train "$f" --set run.progress=false ${steps:+--set run.steps=$steps} "${ck[@]}" 2>&1 | grep -v "^\s*$" | tail -3
    cp runs/needle-11m/$name/metrics.jsonl "$OUT/metrics-$name.jsonl"
    tail -2 "$OUT/metrics-$name.jsonl"
    prev=runs/needle-11m/$name/final
  done
  tar -C "$(dirname "$prev")" -cf - final | split -b 15m - "$OUT/final.tar.part-" ;;
eval)
  MODEL=${MODEL:-src/longcpm/assets/needle-11m}
  timeout ${EVAL_TIMEOUT:-420} python3 -m longcpm.cli.main eval --model "$MODEL" --tasks all \
    --lengths ${LENGTHS:-4K,8K,16K,32K,64K} --seeds ${SEEDS:-10} --attention dense,sparse \
    --out "$OUT/quality.json" 2>&1 | tail -40 ;;
esac
