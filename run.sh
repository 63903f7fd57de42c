#!/usr/bin/env bash
# One-command setup: `bash run.sh chat [chat.py args]`, `bash run.sh test [pytest args]` or `bash run.sh lint`.
# Creates .venv (Python 3.10+), installs nanodp and its dependencies, fetches the default model, then runs.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  # torch is pinned to a release; on a machine without an NVIDIA GPU prefer a CPU-only build if your
  # index has one (set NANODP_TORCH_SPEC, e.g. "torch==2.13.0+cpu", or install torch yourself first).
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q "${NANODP_TORCH_SPEC:-torch==2.13.0}"
fi
if ! "$VPY" -c "import nanodp.kernels, triton, tokenizers, gguf, rich, jinja2, prompt_toolkit, pytest, xdist, \
    transformers, accelerate, ruff, build" 2>/dev/null; then
  "$VPY" -m pip install -q -e ".[test]"
fi
# Many tiny CPU ops (decode of a small model, the torch twins) are dominated by OpenMP thread wake-ups on
# small VMs; one thread was 2x faster for the test suite on a 2-core machine. Override by setting it.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cmd=${1:-chat}
shift || true
case "$cmd" in
  chat) "$VPY" weights/fetch_default.py && exec "$VPY" chat.py "$@" ;;
  test) "$VPY" weights/fetch_default.py && exec "$VPY" -m pytest -q -n auto "$@" ;;  # one worker a core (xdist)
  lint) "$VPY" weights/fetch_default.py && "$VPY" -m ruff check . && exec "$VPY" -m ruff format --check . ;;
  *) echo "usage: bash run.sh chat|test|lint [args]" >&2; exit 2 ;;
esac
