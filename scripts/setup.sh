#!/usr/bin/env bash
# One set-up for every entry point: a virtual environment in the checkout (.venv/),
# torch pinned first (CPU build here, see constraints-cpu.txt), then the package.
#   scripts/setup.sh          runtime install
#   scripts/setup.sh dev      runtime + test dependencies
# Idempotent: a second run with nothing changed only checks imports.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA="${1:-}"
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints-cpu.txt)
stamp="$VENV/.installed${EXTRA:+-$EXTRA}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints-cpu.txt -nt "$stamp" ]; then
  # torch first: every later resolution then sees it installed and pulls nothing CUDA.
  "${PIP[@]}" torch==2.13.0 torchvision==0.28.0
  # deepspeed builds against the installed torch; without this flag pip fetches another torch to build it.
  "${PIP[@]}" --no-build-isolation deepspeed
  "${PIP[@]}" -e ".${EXTRA:+[$EXTRA]}"
  touch "$stamp"
fi
"$VENV/bin/python" -c "import pretrain, pretrain.models" >/dev/null
