#!/usr/bin/env bash
# The README's test command: set up (same path as the demo), lint, type-check, then the test suites.
# Default suite first (< ~15 min on 2 cores), then the slow suite, then the netns suite (needs root, ip, tc).
set -euo pipefail
cd "$(dirname "$0")/.."
# Both models are pulled, so tests that need them must run: a missing model fails instead of skipping.
EDGEBUS_WITH_GEMMA=1 bash scripts/setup.sh
export EDGEBUS_REQUIRE_MODELS=1
VPY=.venv/bin/python
echo "== ruff"; .venv/bin/ruff check edgebus qkv nodes tests
echo "== mypy"; .venv/bin/mypy
echo "== pytest (default suite)"
"$VPY" -m pytest -q
suite() {
  # exit 5 = nothing collected in that suite; anything else non-zero is a failure
  local rc=0; "$VPY" -m pytest -q -m "$1" || rc=$?
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then exit "$rc"; fi
}
if [ "$(id -u)" = "0" ] && command -v ip >/dev/null && command -v tc >/dev/null; then
  echo "== pytest (slow and netns)"; suite "slow or netns"
else
  echo "== pytest (slow; the netns suite needs root with ip and tc and is not run)"; suite "slow and not netns"
fi
