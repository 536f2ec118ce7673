#!/usr/bin/env bash
# Every GPU check in one command, on a GPU machine, from the project root:
#   scripts/gpu_check.sh                  # `pytest -m gpu` (tests/test_gpu.py), then `bench gpu`
#   BENCH_ARGS="--quick" scripts/gpu_check.sh
#   PARTS=tests scripts/gpu_check.sh      # one part (tests | bench), e.g. to fit a time limit per command
#   PYTEST_ARGS="-k bf16" PARTS=tests scripts/gpu_check.sh   # a subset of the gpu tests
# Logs, JSON and summary.md go to $OUT if set, else ./gpu_check_out. On an offline machine the wheels
# the image lacks (deepspeed, webdataset, pytest, ...; scripts/gpu_wheels.sh puts them in .whl/) are installed
# into /tmp/site first, and the package runs as `python3 -m pretrain` (../shared/GPU.md).
# Exit status: 0 when the tests and the benchmark both ran clean, else 1.
set -uo pipefail
OUT=${OUT:-./gpu_check_out}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
PARTS=${PARTS:-tests bench}
mkdir -p "$OUT"

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl || exit 1
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda \
  TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_ext}

{ nvidia-smi || true
  "$PY" -c "import torch, deepspeed, timm, pretrain
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__, 'timm', timm.__version__)
print('gpu', torch.cuda.get_device_name(), 'bf16 native', torch.cuda.is_bf16_supported(including_emulation=False))"
} > "$OUT/env.txt" 2>&1
env_rc=$?
cat "$OUT/env.txt"
[ $env_rc -eq 0 ] || { echo "gpu_check: the environment is incomplete (see $OUT/env.txt)"; exit 1; }

tests_rc=0 bench_rc=0
if [[ " $PARTS " == *" tests "* ]]; then
  "$PY" -c "import pytest" 2>/dev/null || echo "gpu_check: pytest is missing here; run scripts/gpu_wheels.sh on a machine with the registries"
  echo "== pytest -m gpu -> $OUT/gpu_tests.log"
  # shellcheck disable=SC2086  # PYTEST_ARGS is a list of flags (e.g. -k to pick tests)
  "$PY" -m pytest -v -m gpu -rs --durations=25 --timeout=300 tests/test_gpu.py ${PYTEST_ARGS:-} \
    --junitxml "$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
  tests_rc=$?
  tail -n 5 "$OUT/gpu_tests.log"
fi
if [[ " $PARTS " == *" bench "* ]]; then
  echo "== bench gpu ${BENCH_ARGS:-} -> $OUT/bench_gpu.log"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
  "$PY" -m pretrain bench gpu ${BENCH_ARGS:-} --json "$OUT/bench_gpu.json" > "$OUT/bench_gpu.log" 2>&1
  bench_rc=$?
  tail -n 8 "$OUT/bench_gpu.log"
fi

"$PY" - "$OUT" "$tests_rc" "$bench_rc" <<'PY' | tee "$OUT/summary.md"
import datetime, json, os, sys
import xml.etree.ElementTree as ET

out, tests_rc, bench_rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
env = open(os.path.join(out, "env.txt")).read().strip().splitlines()
print(f"# GPU check, {datetime.date.today()}\n")
print("\n".join(f"    {line}" for line in env if line.startswith(("torch ", "gpu "))), "\n")
xml = os.path.join(out, "gpu_tests.xml")
if os.path.exists(xml):
    s = ET.parse(xml).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    n, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
    print(f"pytest -m gpu: {n - f - e - k} passed, {f} failed, {e} errors, {k} skipped (exit {tests_rc})\n")
    for case in s.iter("testcase"):
        for bad in [*case.findall("failure"), *case.findall("error")]:
            first = ((bad.get("message") or "").splitlines() or [""])[0][:200]
            print(f"- FAILED {case.get('name')}: {first}")
else:
    print(f"pytest -m gpu: no report (exit {tests_rc}); see gpu_tests.log\n")
bench = os.path.join(out, "bench_gpu.json")
print(f"\nbench gpu (exit {bench_rc}):\n")
if os.path.exists(bench) and bench_rc == 0:
    print("| benchmark | ours img/s | timm loop img/s | ratio | MFU | goal | met |\n|---|---|---|---|---|---|---|")
    for r in json.load(open(bench)):
        print(f"| {r['name']} | {r['ours']:.1f} | {r['baseline']:.1f} | {r['ratio']:.3f} | {r.get('mfu', float('nan')):.3f} "
              f"| {r.get('goal', '')} | {r.get('met')} |")
else:
    print("no results; see bench_gpu.log")
PY
[ $tests_rc -eq 0 ] && [ $bench_rc -eq 0 ]
