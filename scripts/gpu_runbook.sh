#!/usr/bin/env bash
# The device runs behind the README's GPU figures, in two parts (each under 10 minutes):
#   bash scripts/gpu_final.sh bench   GPU tests, bench e2e (default model + Llama-3.1-8B shape), bench sparse, select variants
#   bash scripts/gpu_final.sh eval    accuracy: development seed 1 (grid), report seed 2 (the dev pick), 16K with YaRN x4
#   bash scripts/gpu_final.sh floor   per-head floors (absolute, relative) against top-k, both seeds at once (2 GPUs)
#   bash scripts/gpu_final.sh floor2  larger relative floors (runtime --floor F%), the pick at 16K and end to end
#   bash scripts/gpu_final.sh seeds   the pick on report seeds 3-6
#   bash scripts/gpu_final.sh csize   8 and 32 tokens per cluster (eval --cluster-size): dev grid, then its pick on seed 2
# The default model is rebuilt from its GGUF, carried to the GPU machine in two parts of < 64 MiB (git-ignored:
# `split -b 50000000 weights/.cache/SmolLM2-135M-Instruct.Q4_1.gguf` into .carry/a/part_aa and .carry/b/part_ab,
# plus `pip download gguf==0.19.0` into .carry/b); logs go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}
if [ ! -f weights/SmolLM2-135M-Instruct/model.safetensors ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/b/gguf-*.whl
  cat .carry/a/part_aa .carry/b/part_ab > /tmp/m.gguf
  PYTHONPATH=/tmp/site python3 weights/fetch_default.py --gguf /tmp/m.gguf > /tmp/fetch.log 2>&1 || { tail /tmp/fetch.log; exit 1; }
fi
DEV=${DEV_METHODS:-dense,doublep:0.95:0.7,doublep-gauss:0.95:0.7,doublep-gauss:0.95:0.9,doublep-gauss:0.99:0.95}
GRID="--lengths 1024,2048,4096,8192 --depths 0.1,0.3,0.5,0.7,0.9 --n 2 --tasks all"
case "${1:-bench}" in
bench)
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt"
  timeout 170 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ -k "not test_gpu_bf16 or base or bisect or sort" \
    > "$OUT/gpu_tests.log" 2>&1
  timeout 130 python3 -m nanodp.bench e2e --models default --steps 48 > "$OUT/e2e.log" 2>&1
  timeout 100 python3 -m nanodp.bench e2e --models llama8b --batches 1,8 --contexts 8k,32k --steps 32 \
    > "$OUT/e2e8b.log" 2>&1
  timeout 100 python3 -m nanodp.bench sparse --profile > "$OUT/sparse.log" 2>&1
  timeout 100 python3 scripts/bench_select.py --budget-s 85 > "$OUT/select.log" 2>&1
  grep -E "passed|failed" "$OUT/gpu_tests.log" | tail -2
  for f in e2e e2e8b sparse select; do grep -v '^{' "$OUT/$f.log" | grep -v -i warn | tail -16; done ;;
eval)
  timeout 250 python3 -m nanodp.eval --seed 1 $GRID --methods "$DEV" --time-limit 200 --out runs/gpu-dev \
    > "$OUT/eval-dev.log" 2>&1
  timeout 200 python3 -m nanodp.eval --seed 2 $GRID --methods dense,doublep:0.95:0.7 --pick-from runs/gpu-dev \
    --time-limit 150 --out runs/gpu-report > "$OUT/eval-report.log" 2>&1
  PICK=$(python3 -c "import json; print(json.load(open('runs/gpu-dev/results.json'))['pick'])" 2>/dev/null)
  timeout 100 python3 -m nanodp.eval --seed 2 --yarn 4 --lengths 16384 --depths 0.1,0.3,0.5,0.7,0.9 --n 1 \
    --tasks passkey,single_needle --methods "dense,${PICK:-doublep:0.95:0.7}" --time-limit 70 --out runs/gpu-yarn \
    > "$OUT/eval-yarn.log" 2>&1
  cp runs/gpu-dev/results.json "$OUT/dev-results.json"; cp runs/gpu-report/results.json "$OUT/report-results.json"
  cp runs/gpu-yarn/results.json "$OUT/yarn-results.json"
  for f in eval-dev eval-report eval-yarn; do grep -v '^{' "$OUT/$f.log" | tail -14; done ;;
floor)   # the per-head floor, Triton kernels, on 2 GPUs (nvidia-h200-x2): the same grid on the development seed 1
         # (GPU 0, it picks) and the report seed 2 (GPU 1, beside the GPU tests of the floor); then the report's
         # tables again with the development pick marked. Absolute (fN) and relative (fF%) floors, top-k at the
         # same bytes (topk=M) and at fixed fractions.
  M=${FLOOR_METHODS:-dense,doublep:0.95:0.7:f10%,doublep:0.95:0.7:f20%,doublep:0.95:0.7:f40%,doublep:0.95:0.7:f5%}
  M=$M,${FLOOR_MORE:-doublep:0.95:0.7:f1024,doublep:0.95:0.7:f256,doublep:0.95:0.7,doublep:0.7:0.7:f10%}
  M=$M,${FLOOR_MORE2:-doublep:0.99:0.9:f10%,doublep:0.95:0.5:f10%,doublep-max:0.95:0.7:f10%}
  M=$M,${FLOOR_MORE3:-doublep-gauss:0.95:0.7:f10%,topk:5%,topk:10%,topk:20%,topk:40%}
  CUDA_VISIBLE_DEVICES=0 timeout 540 python3 -m nanodp.eval --seed 1 $GRID --methods "$M" --time-limit 470 \
    --out runs/gpu-floor-dev > "$OUT/floor-dev.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout 540 python3 -m nanodp.eval --seed 2 $GRID --methods "$M" --time-limit 470 \
    --out runs/gpu-floor-report > "$OUT/floor-report.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_doublep.py tests/test_gpu_engine.py \
    tests/test_sparse_engine.py -k "floor or gpu" > "$OUT/gpu_tests.log" 2>&1
  wait
  python3 -m nanodp.eval --plot-only runs/gpu-floor-report --pick-from runs/gpu-floor-dev > "$OUT/floor-report2.log" 2>&1
  cp runs/gpu-floor-dev/results.json "$OUT/floor-dev.json"; cp runs/gpu-floor-report/results.json "$OUT/floor-report.json"
  grep -E "passed|failed" "$OUT/gpu_tests.log" | tail -2
  grep -v '^{' "$OUT/floor-dev.log" | grep -v "━" | tail -36; grep -v '^{' "$OUT/floor-report2.log" | tail -36 ;;
floor2)  # the follow-up (after the runtime relative floor, --floor F%): larger floors on both seeds (2 GPUs, as
         # floor), GPU tests of the relative floor; then the development pick at 16K (YaRN x4) and end to end
  M=${FLOOR2_METHODS:-dense,doublep:0.95:0.7:f40%,doublep:0.95:0.7:f50%,doublep:0.95:0.7:f60%,doublep:0.95:0.7:f30%}
  M=$M,${FLOOR2_MORE:-doublep:0.99:0.9:f40%,topk:50%,topk:60%}
  CUDA_VISIBLE_DEVICES=0 timeout 400 python3 -m nanodp.eval --seed 1 $GRID --methods "$M" --time-limit 330 \
    --out runs/gpu-floor2-dev > "$OUT/floor2-dev.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout 400 python3 -m nanodp.eval --seed 2 $GRID --methods "$M" --time-limit 330 \
    --out runs/gpu-floor2-report > /tmp/floor2-report.log 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_doublep.py tests/test_gpu_engine.py \
    -k "floor or gpu" > "$OUT/gpu_tests2.log" 2>&1
  wait
  python3 -m nanodp.eval --plot-only runs/gpu-floor2-report --pick-from runs/gpu-floor2-dev > "$OUT/floor2-report.log" 2>&1
  PICK=$(python3 -c "import json; print(json.load(open('runs/gpu-floor2-dev/results.json'))['pick'])")
  FLAGS=$(python3 -c "s='$PICK'.split(':'); print(f'--p1 {s[1]} --p2 {s[2]}' + (f' --floor {s[3][1:]}' if len(s) > 3 else ''))")
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m nanodp.eval --seed 2 --yarn 4 --lengths 16384 --depths 0.1,0.3,0.5,0.7,0.9 \
    --n 1 --tasks passkey,single_needle --methods "dense,$PICK" --time-limit 110 --out runs/gpu-floor2-yarn \
    > "$OUT/floor2-yarn.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout 150 python3 -m nanodp.bench e2e --models default --batches 1,8,32 --contexts 8k \
    --steps 48 --no-transformers $FLAGS > "$OUT/floor2-e2e.log" 2>&1
  wait
  cp runs/gpu-floor2-dev/results.json "$OUT/floor2-dev.json"; cp runs/gpu-floor2-report/results.json "$OUT/floor2-report.json"
  grep -E "passed|failed" "$OUT/gpu_tests2.log" | tail -2; echo "pick $PICK -> $FLAGS"
  grep -v '^{' "$OUT/floor2-e2e.log" | grep -v -i warn | tail -8; grep -v '^{' "$OUT/floor2-yarn.log" | grep -v "━" | tail -8
  grep -v '^{' "$OUT/floor2-dev.log" | grep -v "━" | head -18; grep -v '^{' "$OUT/floor2-report.log" | head -20 ;;
seeds)   # the development pick (floor2's) on more report seeds, 3-6, two at a time (2 GPUs)
  M=${SEEDS_METHODS:-dense,doublep:0.95:0.7:f40%}
  for pair in "3 4" "5 6"; do
    set -- $pair
    CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m nanodp.eval --seed $1 $GRID --methods "$M" --time-limit 170 \
      --out runs/gpu-seed$1 > "$OUT/seed$1.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m nanodp.eval --seed $2 $GRID --methods "$M" --time-limit 170 \
      --out runs/gpu-seed$2 > "$OUT/seed$2.log" 2>&1
    wait
  done
  for s in 3 4 5 6; do grep -v '^{' "$OUT/seed$s.log" | grep -v "━" | head -6; done ;;
csize)   # cluster size: 8 (GPU 0) and 32 (GPU 1) tokens per cluster against the default 16 (floor/floor2's runs):
         # a floor grid and top-k on the development seed 1, then that run's pick on the report seed 2
  M=${CSIZE_METHODS:-dense,doublep:0.95:0.7:f10%,doublep:0.95:0.7:f20%,doublep:0.95:0.7:f30%,doublep:0.95:0.7:f40%}
  M=$M,topk:10%,topk:20%,topk:30%
  for pair in "0 8" "1 32"; do
    set -- $pair
    ( CUDA_VISIBLE_DEVICES=$1 timeout 300 python3 -m nanodp.eval --seed 1 $GRID --cluster-size $2 --methods "$M" \
        --time-limit 260 --out runs/gpu-cs$2-dev > "$OUT/cs$2-dev.log" 2>&1
      CUDA_VISIBLE_DEVICES=$1 timeout 200 python3 -m nanodp.eval --seed 2 $GRID --cluster-size $2 --methods dense \
        --pick-from runs/gpu-cs$2-dev --time-limit 170 --out runs/gpu-cs$2-report > "$OUT/cs$2-report.log" 2>&1 ) &
  done
  wait
  cp runs/gpu-cs8-dev/results.json "$OUT/cs8-dev.json"; cp runs/gpu-cs32-dev/results.json "$OUT/cs32-dev.json"
  for c in 8 32; do grep -v '^{' "$OUT/cs$c-dev.log" | grep -v "━" | head -16; grep -v '^{' "$OUT/cs$c-report.log" | grep -v "━" | head -7; done ;;
esac
