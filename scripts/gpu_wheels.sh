#!/usr/bin/env bash
# Wheels for an offline GPU machine, into .whl/ (git-ignored): what its image lacks for the package
# (../shared/gpu/wheels.sh: deepspeed, webdataset, simplejpeg, ...) plus pytest, which scripts/gpu_check.sh
# needs for `pytest -m gpu` and the image does not have. Run after scripts/setup.sh, from any folder.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-../shared/gpu/wheels.sh}
[ -x "$WHEELS" ] || { echo "gpu_wheels: $WHEELS not found; set WHEELS to the workplace's wheels script"; exit 1; }
"$WHEELS"
# pure-Python wheels: any platform; the GPU machine runs Python 3.12
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
  pytest pluggy iniconfig packaging pygments pytest-timeout
ls -1 .whl
