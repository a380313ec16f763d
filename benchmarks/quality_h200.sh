#!/usr/bin/env bash
# Device driver for issue 6: PART=train | eval, RECIPE=needle-27m (examples/train/$RECIPE). Logs, metrics and the
# model land in $OUT.
#   train: the stages in STAGES (default "1 2"). BUDGETs (seconds) become run.steps from a 40-step calibration of
#          that stage (the rate of its last 10 steps); STEPSs fix them instead. FROM=folder starts the first stage
#          listed from that model (e.g. a carried copy of an earlier stage). The last stage's final model comes back
#          as a tar of the bf16 folder in 15 MiB parts, $OUT/model.tar.part-* (device files come back <= 16 MiB
#          each, 8 files at most); unpack with: cat model.tar.part-* | tar -xf -
#          A warm machine keeps runs/: FRESH=1 clears it, else the trainer would resume from it.
#   eval:  the quality table of MODEL (dense vs sparse) at LENGTHS with SEEDS seeds, written to $OUT/quality.json
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out}; mkdir -p "$OUT"
RECIPE=${RECIPE:-needle-27m}
dir=examples/train/$RECIPE
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if ! timeout 120 python3 -m pytest -q -p no:cacheprovider tests/ops/test_packed.py 2>&1 | tail -2; then
  echo "packed varlen attention failed its test here: training with the per-document loop"
  export LONGCPM_PACKED_VARLEN=0
fi
case "${PART:-train}" in
train)
  prev=${FROM:-}
  [ -n "${FRESH:-}" ] && rm -rf "runs/$RECIPE"
  for s in ${STAGES:-1 2}; do
    f=$(ls $dir/${s}_*.toml); name=$(basename "$f" .toml)
    ck=(); [ -n "$prev" ] && ck=(--set "model.checkpoint=$prev")
    sv=STEPS$s; bv=BUDGET$s; steps=${!sv:-}
    if [ -z "$steps" ] && [ -n "${!bv:-}" ]; then
      t0=$(date +%s)
      timeout 300 python3 -m longcpm.train "$f" --set run.steps=40 --set schedule.warmup_steps=2 --set run.log_every=10 \
        --set run.progress=false --set run.out_dir=/tmp/calib/$s --set run.resume=false "${ck[@]}" >/tmp/calib-$s.log 2>&1
      tail -3 /tmp/calib-$s.log
      spent=$(( $(date +%s) - t0 ))
      cp /tmp/calib/$s/metrics.jsonl "$OUT/calib-$name.jsonl"
      steps=$(python3 -c "import json; r=[json.loads(l) for l in open('/tmp/calib/$s/metrics.jsonl')]; \
print(max(50, int((${!bv} - $spent) * r[-1]['tokens_per_s'] * r[-1]['step'] / r[-1]['tokens_seen'])))")
      echo "stage $s: calibration took ${spent}s, $(tail -1 /tmp/calib/$s/metrics.jsonl) -> $steps steps"
    fi
    python3 -m longcpm.train "$f" --set run.progress=false ${steps:+--set run.steps=$steps} "${ck[@]}" 2>&1 \
      | grep -v "^\s*$" | tail -3
    cp "runs/$RECIPE/$name/metrics.jsonl" "$OUT/metrics-$name.jsonl"
    python3 - "$OUT/metrics-$name.jsonl" <<'PY'
import json, sys
r = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
for x in r[:: max(1, len(r) // 12)] + r[-1:]:
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in x.items() if k in
           ("step", "loss_mean", "lr", "tokens_per_s", "dense")})
PY
    prev=runs/$RECIPE/$name/final
  done
  # the embedding table alone is over the per-file limit: a tar of the bf16 folder, cut into 15 MiB parts
  rm -rf /tmp/export && python3 examples/train/export.py "$prev" /tmp/export/model --dtype bfloat16
  tar -C /tmp/export -cf - model | split -b 15m - "$OUT/model.tar.part-" ;;
eval)
  MODEL=${MODEL:-src/longcpm/assets/$RECIPE}
  timeout ${EVAL_TIMEOUT:-540} python3 -m longcpm.cli.main eval --model "$MODEL" --tasks ${TASKS:-all} \
    --lengths ${LENGTHS:-4K,8K,16K,32K,64K} --seeds ${SEEDS:-10} --attention dense,sparse \
    --out "$OUT/quality.json" 2>&1 | tail -${TAIL:-60} ;;
esac
