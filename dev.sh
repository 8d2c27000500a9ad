#!/usr/bin/env bash
# servelab on a fresh machine: each command creates the environment and installs what is missing.
#   ./dev.sh start [servelab dashboard options]   the product (dashboard + worker) on its embedded default
#   ./dev.sh test  [pytest options]               the quality gate (./dev.sh check), then the test suite
#   ./dev.sh check                                lint-imports, ruff and mypy on runner/ and dashboard/
#   ./dev.sh setup [test]                         only the environment
# The environment lives outside the checkout (SERVELAB_VENV, default ~/.local/share/servelab/venv)
# so that clones share it. vLLM's GPU build is installed where nvidia-smi sees a GPU, else the CPU build.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${SERVELAB_VENV:-$HOME/.local/share/servelab/venv}

setup() {
  local extras=eval backend=cpu
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then backend=gpu; fi
  extras="$extras,$backend"
  [ "${1:-}" = test ] && extras="$extras,test,postgres,ray"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  local stamp="$VENV/.servelab-$(cat pyproject.toml | sha256sum | cut -c1-16)-$extras"
  if [ ! -f "$stamp" ]; then
    echo "servelab: installing .[$extras] into $VENV (first time only)" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[$extras]"
    if [ "$backend" = cpu ]; then
      # PyPI's torchvision/torchaudio builds break `transformers` imports beside the CPU torch.
      "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    touch "$stamp"
  else
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
      || "$VENV/bin/python" -m pip install -q --no-deps -e .
  fi
  # The store's tests run on PostgreSQL too: tests/conftest.py starts a throwaway server from Debian's
  # packages (/usr/lib/postgresql/<version>/bin) and fails them without one, so a test run stops here instead.
  if [ "${1:-}" = test ] && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
      echo "servelab: the store tests need Debian's PostgreSQL server: sudo apt-get install postgresql" >&2
      exit 1
    fi
    echo "servelab: installing Debian postgresql for the store tests" >&2
    if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
      || ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
      echo "servelab: postgresql could not be installed (apt-get install postgresql); the store tests need it" >&2
      exit 1
    fi
  fi
  # The browser tests drive Debian's chromium at /usr/bin/chromium through the test extra's python playwright;
  # without it they fail, so a test run stops here when it cannot be had.
  if [ "${1:-}" = test ] && [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" != 0 ]; then
      echo "servelab: the browser tests need Debian's chromium at /usr/bin/chromium: sudo apt-get install chromium" >&2
      exit 1
    fi
    echo "servelab: installing Debian chromium for the browser tests" >&2
    if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || [ ! -x /usr/bin/chromium ]; then
      echo "servelab: chromium could not be installed (apt-get install chromium); the browser tests need it" >&2
      exit 1
    fi
  fi
}

# The quality gate (pyproject holds the settings): layer contracts, lint, types. Any finding fails.
check() {
  "$VENV/bin/lint-imports"
  "$VENV/bin/ruff" check runner dashboard
  "$VENV/bin/mypy" runner dashboard
}

cmd=${1:-start}
shift || true
case "$cmd" in
  setup) setup "${1:-}" ;;
  start) setup; exec "$VENV/bin/servelab" dashboard "$@" ;;
  check) setup test; check ;;
  test) setup test; check; exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: ./dev.sh start|test|check|setup" >&2; exit 2 ;;
esac
