#!/usr/bin/env bash
# The README's main-job command: set up (venv, CPU torch, package, default model) and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/edgebus demo "$@"
