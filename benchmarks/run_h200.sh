#!/usr/bin/env bash
# One device call: the GPU tests, then the attention benchmark; logs and JSON land in $OUT.
# usage (from the repo root, on the GPU machine): bash benchmarks/run_h200.sh [attention args...]
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/ops tests/test_model_sparse.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
fi
timeout ${BENCH_TIMEOUT:-420} python3 benchmarks/attention.py --out "$OUT" "$@" 2>&1 | tee "$OUT/attention.log" | grep -v "^{" | tail -40
