#!/usr/bin/env bash
# One device call for the engine and server: GPU engine tests, the e2e benchmark, a loopback server load test.
# usage (repo root, GPU machine): PART=tests,e2e8b,e2e05b,serve bash benchmarks/run_h200_engine.sh
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
PART=${PART:-tests,e2e8b}
has() { [[ ",$PART," == *",$1,"* ]]; }
if has tests; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/engine -m gpu tests/test_generation.py -k "cuda or gpu" \
    2>&1 | tee "$OUT/engine-gpu-tests.log" | tail -12
fi
has e2e8b && timeout ${E2E_TIMEOUT:-300} python3 benchmarks/e2e.py --shapes 8b --out "$OUT" 2>&1 | tee "$OUT/e2e-8b.log" | tail -25
has e2e05b && timeout ${E2E_TIMEOUT:-300} python3 benchmarks/e2e.py --shapes 0.5b --out "$OUT" 2>&1 | tee "$OUT/e2e-05b.log" | tail -25
if has serve; then
  python3 -m longcpm.cli.main new-model /tmp/m05 --config minicpm4-0.5b >/dev/null
  python3 -m longcpm.cli.main serve --model /tmp/m05 --device cuda --dtype bfloat16 --port 8123 --max-num-seqs 64 \
    > "$OUT/serve.log" 2>&1 &
  SP=$!
  for i in $(seq 1 90); do curl -sf http://127.0.0.1:8123/health >/dev/null && break; sleep 1; done
  timeout 150 python3 -m longcpm.server.bench --url http://127.0.0.1:8123 --concurrency 1 16 64 --duration 8 \
    --max-tokens 128 --json "$OUT/serve-h200.json" 2>&1 | tail -15
  kill -TERM $SP; wait $SP
  tail -3 "$OUT/serve.log"
fi
