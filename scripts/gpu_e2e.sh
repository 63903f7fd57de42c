#!/usr/bin/env bash
# Device run used for the README's end-to-end figures: rebuild the default model from a GGUF carried in two
# parts (.carry/a, .carry/b, git-ignored: the GPU box has no network), then GPU tests and `bench e2e`.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
if [ ! -f weights/SmolLM2-135M-Instruct/.complete ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/b/gguf-*.whl
  export PYTHONPATH=/tmp/site
  mkdir -p weights/.cache
  cat .carry/a/part_aa .carry/b/part_ab > weights/.cache/SmolLM2-135M-Instruct.Q4_1.gguf
  python3 weights/fetch_default.py --gguf weights/.cache/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_engine.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
timeout 330 python3 -m nanodp.bench e2e --models default --steps 48 "$@" --out "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log"
