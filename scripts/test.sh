#!/usr/bin/env bash
# The README's test command: set up (same path as the demo), lint, type-check, then the test suites.
# Default suite first (< ~15 min on 2 cores), then the slow suite, then the netns suite (needs root, ip, tc).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
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
echo "== pytest (slow)"; suite slow
if [ "$(id -u)" = "0" ] && command -v ip >/dev/null && command -v tc >/dev/null; then
  echo "== pytest (netns)"; suite netns
else
  echo "== pytest (netns) not run: needs root with ip and tc"
fi
