#!/usr/bin/env bash
# Every GPU check in one command of at most BUDGET_S seconds, on a GPU machine, from the project root; the parts
# run in order of value, each under what is left of the budget, each writing its JSON and log to $OUT as it goes:
#   bench_b  `bench gpu` ViT-B/16 batch 256: ours compiled vs the compiled timm loop, MAE-B compiled, then eager
#   bench_l  `bench gpu` ViT-L/16 from batch L_BATCH (halved until it fits): compiled, then eager
#   feed     `bench feed`: ViT-B/16 (DeiT augmentations) and MAE-B fed from JPEG shards written there, full-size and
#            pre-resized, data.decode cpu and gpu, against the same Trainer on synthetic batches (FEED_ARGS; at
#            most F_S=120 s: with bench_b's and bench_l's caps it fills BUDGET_S, so the tests get what the
#            benches leave; plan a second call PARTS=tests)
#   tests    `pytest -m gpu` (tests/test_gpu.py) with the time left
#   memory   `bench memory` (the largest micro-batch per arch, task and checkpointing; docs/benchmarks.md "Memory
#            table"), at most MEMORY_S, only when PARTS names it: its cap after bench_b, bench_l and feed (270 + 150 +
#            120 s) overruns BUDGET_S, so it runs after the tests with what they leave, or alone (PARTS=memory)
#   scripts/gpu_check.sh                       # bench_b, bench_l, feed, tests within BUDGET_S (default 540 s)
#   PARTS=memory scripts/gpu_check.sh          # the memory table alone (MEMORY_S=500 for more of its rows)
#   DRY_RUN=1 PYTHON=.venv/bin/python scripts/gpu_check.sh   # the same parts on the CPU (--gpu-dry-run, --memory-dry-run)
#   PARTS="bench_b tests" ATTENTION=flash,cudnn scripts/gpu_check.sh   # some parts; attention backends of ours
#   PYTEST_ARGS="-k bf16" PARTS=tests scripts/gpu_check.sh   # a subset of the gpu tests
# Settings: B_VARIANTS, L_VARIANTS (bench gpu --gpu-variants), L_BATCH, ATTENTION (--gpu-attention; needs the
# model.attention_backend config key), BENCH_ARGS (more bench gpu flags), B_S / L_S / F_S / MEMORY_S (each bench part's
# cap in s), MEMORY_ARGS (more bench memory flags, e.g. "--memory-archs vit_large_patch16_224 --memory-ckpt off").
# JSON, one log for the bench parts (bench.log), the tests' log and report and summary.md go to $OUT if set, else
# ./gpu_check_out (8 files at most, all parts run). On an offline machine the
# wheels the image lacks (deepspeed, webdataset, pytest, ...; scripts/gpu_wheels.sh puts them in .whl/) are
# installed into /tmp/site first, and the package runs as `python3 -m pretrain` (../shared/GPU.md).
# Exit status: 0 when every part ran clean, else 1.
set -uo pipefail
OUT=${OUT:-./gpu_check_out}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
PARTS=${PARTS:-bench_b bench_l feed tests}
BUDGET_S=${BUDGET_S:-540}
DRY_RUN=${DRY_RUN:-0}
B_VARIANTS=${B_VARIANTS:-timm_compiled,ours_compiled,mae_compiled,timm,ours,mae}
L_VARIANTS=${L_VARIANTS:-timm_compiled,ours_compiled,timm,ours}
L_BATCH=${L_BATCH:-512}
mkdir -p "$OUT"

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl || exit 1
fi
accel=cuda
[ "$DRY_RUN" = 1 ] && accel=cpu
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DS_ACCELERATOR=$accel \
  TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_ext}

{ nvidia-smi || true
  "$PY" -c "import torch, pretrain._compat, deepspeed, timm  # _compat before timm: a CPU-only torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__, 'timm', timm.__version__)
if torch.cuda.is_available():
    print('gpu', torch.cuda.get_device_name(), 'bf16 native', torch.cuda.is_bf16_supported(including_emulation=False))
else:
    print('gpu none: the CPU (dry run)' if '$DRY_RUN' == '1' else 'gpu none'); assert '$DRY_RUN' == '1', 'no CUDA device'"
} > "$OUT/env.txt" 2>&1
env_rc=$?
cat "$OUT/env.txt"
[ $env_rc -eq 0 ] || { echo "gpu_check: the environment is incomplete (see $OUT/env.txt)"; exit 1; }

left() { echo $(( BUDGET_S - SECONDS )); }
cap() { local l; l=$(left); echo $(( $1 < l ? $1 : l )); }  # a part's limit: its cap or what is left
# SIGINT first: a bench keeps the rows it wrote, pytest still writes its report
limited() { local s=$1; shift; [ "$s" -gt 10 ] || { echo "gpu_check: no time left for $*"; return 124; }
  timeout -s INT -k 20 "$s" "$@"; }
declare -A rc=()
bench() {  # bench PART BENCH JSON_NAME LIMIT_S ARGS...: one `bench BENCH` invocation, its log appended to bench.log
  local part=$1 which=$2 name=$3 limit=$4; shift 4
  [[ " $PARTS " == *" $part "* ]] || return 0
  [ "$DRY_RUN" = 1 ] && set -- "$@" "--$which-dry-run"
  echo "== bench $which $* (${limit} s) -> $OUT/$name.json" | tee -a "$OUT/bench.log"
  limited "$limit" "$PY" -m pretrain bench "$which" "$@" --json "$OUT/$name.json" > "$OUT/$name.tmp.log" 2>&1
  rc[$part]=$?
  cat "$OUT/$name.tmp.log" >> "$OUT/bench.log" && rm -f "$OUT/$name.tmp.log"
  tail -n 8 "$OUT/bench.log"
}
# shellcheck disable=SC2086  # BENCH_ARGS and MEMORY_ARGS are lists of flags
bench bench_b gpu bench_gpu_b "$(cap "${B_S:-270}")" --gpu-archs vit_base_patch16_224 --gpu-batch 256 \
  --gpu-variants "$B_VARIANTS" ${ATTENTION:+--gpu-attention "$ATTENTION"} ${BENCH_ARGS:-}
# shellcheck disable=SC2086
bench bench_l gpu bench_gpu_l "$(cap "${L_S:-150}")" --gpu-archs vit_large_patch16_224 --gpu-batch "$L_BATCH" \
  --gpu-variants "$L_VARIANTS" --gpu-steps 5 --gpu-rounds 3 ${ATTENTION:+--gpu-attention "$ATTENTION"} ${BENCH_ARGS:-}
# shellcheck disable=SC2086  # FEED_ARGS is a list of flags
bench feed feed bench_feed "$(cap "${F_S:-120}")" ${FEED_ARGS:-}
if [[ " $PARTS " == *" tests "* ]]; then
  "$PY" -c "import pytest" 2>/dev/null || echo "gpu_check: pytest is missing here; run scripts/gpu_wheels.sh on a machine with the registries"
  echo "== pytest -m gpu ($(left) s) -> $OUT/gpu_tests.log"
  # shellcheck disable=SC2086  # PYTEST_ARGS is a list of flags (e.g. -k to pick tests)
  limited "$(left)" "$PY" -m pytest -v -m gpu -rs --durations=25 --timeout=300 tests/test_gpu.py ${PYTEST_ARGS:-} \
    --junitxml "$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
  rc[tests]=$?
  tail -n 5 "$OUT/gpu_tests.log"
fi
# the search stops itself 20 s before its limit (a probe is never started past --memory-budget-s), keeping its rows
mem_s=$(cap "${MEMORY_S:-150}")
# shellcheck disable=SC2086
bench memory memory bench_memory "$mem_s" --memory-budget-s $(( mem_s > 30 ? mem_s - 20 : 10 )) ${MEMORY_ARGS:-}

"$PY" - "$OUT" "$(for p in "${!rc[@]}"; do echo "$p=${rc[$p]}"; done)" <<'PY' | tee "$OUT/summary.md"
import datetime, json, math, os, sys
import xml.etree.ElementTree as ET

out, rcs = sys.argv[1], dict(kv.split("=") for kv in sys.argv[2].split())
env = open(os.path.join(out, "env.txt")).read().strip().splitlines()
print(f"# GPU check, {datetime.date.today()}\n")
print("\n".join(f"    {line}" for line in env if line.startswith(("torch ", "gpu "))), "\n")
xml = os.path.join(out, "gpu_tests.xml")
if os.path.exists(xml):
    s = ET.parse(xml).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    n, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
    print(f"pytest -m gpu: {n - f - e - k} passed, {f} failed, {e} errors, {k} skipped (exit {rcs.get('tests')})\n")
    for case in s.iter("testcase"):
        for bad in [*case.findall("failure"), *case.findall("error")]:
            first = ((bad.get("message") or "").splitlines() or [""])[0][:200]
            print(f"- FAILED {case.get('name')}: {first}")
elif "tests" in rcs:
    print(f"pytest -m gpu: no report (exit {rcs['tests']}); see gpu_tests.log\n")


def num(x, fmt):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table(part, title, name, columns, cells):
    """A bench part's rows as a table (`cells(r)`: the row of result r), or where to look when it wrote none."""
    if part not in rcs:
        return
    print(f"\n{title} (exit {rcs[part]}; 124: cut at its time limit, the rows below finished):\n")
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        print("no results; see bench.log")
        return
    print(f"| {' | '.join(columns)} |\n{'|---' * len(columns)}|")
    for r in json.load(open(path)):
        print(f"| {' | '.join(map(str, cells(r)))} |")


for part, name in (("bench_b", "bench_gpu_b"), ("bench_l", "bench_gpu_l")):
    table(part, f"bench gpu, {part}", name,
          ("variant", "batch", "img/s", "vs", "its img/s", "ratio", "MFU", "MFU ratio", "warm-up s", "goal", "met"),
          lambda r: (r["name"], r["batch"], num(r["ours"], ",.0f"), r["baseline_variant"] or "-",
                     num(r["baseline"], ",.0f"), num(r["ratio"], ".3f"), num(r["mfu"], ".1%"),
                     num(r["mfu_ratio"], ".3f"), num(r["warmup_s"], ".0f"), r["goal"], r["met"]))
table("feed", "bench feed", "bench_feed",
      ("row", "image", "batch", "workers", "fed img/s", "synthetic img/s", "ratio", "data wait ms/step", "cores",
       "synthetic cores", "drained", "goal", "met"),
      lambda r: (r["name"], r["image"], r["batch"], r["workers"], num(r["ours"], ",.0f"), num(r["baseline"], ",.0f"),
                 num(r["ratio"], ".3f"), num(r["data_wait_s_per_step"] * 1e3, ".1f"), num(r["cores"], ".1f"),
                 num(r["baseline_cores"], ".1f"), r["drained"], r["goal"], r["met"]))
table("memory", "bench memory, ZeRO 0, one rank", "bench_memory",
      ("arch", "task", "checkpointing", "largest batch", "fails at", "peak GiB", "img/s",
       "probes (+ fit, - OOM, ! error)", "stopped"),
      lambda r: (r["arch"], r["kind"], "on" if r["grad_checkpointing"] else "off", r["ours"], r["fails_at"] or "-",
                 num(r["peak_bytes"] and r["peak_bytes"] / 2**30, ".1f"), num(r["img_s"], ",.0f"),
                 " ".join(f"{p['batch']}{ {True: '+', False: '-'}.get(p['fits'], '!') }" for p in r["probes"]),
                 r["stopped"] or "-"))
PY
for p in "${!rc[@]}"; do [ "${rc[$p]}" -eq 0 ] || exit 1; done
