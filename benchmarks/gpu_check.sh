#!/usr/bin/env bash
# GPU check, sized for a 15-minute device lease (estimated 8-10 minutes on an H100/H200 with 16 cores):
#   1. build the CUDA extension in place (the image's torch, nvcc, ninja; no dependency resolution);
#   2. warm the compile caches in parallel (python -m flagdit_kernels.bench.warm): Triton kernels, every
#      autotune config, Inductor graphs of the torch.compile / FlexAttention baselines;
#   3. the test suite on CUDA (bf16 included), spread over CPU cores with pytest-xdist when installed,
#      untuned (tests/conftest.py sets FLAGDIT_KERNELS_AUTOTUNE=0);
#   4. the benchmarks (autotuned, timed on an idle GPU), then the Markdown table and chart from their JSON.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (default $OUT, else ./gpu_out)
# Writes at most 8 files under OUT_DIR: info.json, build.log, warm.log, tests.log, bench.log, bench.json,
# report.md, roofline.png. Knobs: BENCH_FAMILIES (default attention,norms,rope,packing; model adds minutes of
# torch.compile, diffusers_lumina needs the diffusers wheel), BENCH_FILTER (pytest -k), JOBS (tests), WARM_JOBS,
# limits in seconds BUILD_TIMEOUT, WARM_TIMEOUT, TEST_TIMEOUT, BENCH_TIMEOUT (per family), DEADLINE (the whole
# script: every phase stops by then, default 540 s, inside a 600 s device call), SKIP_TESTS=1 / SKIP_BENCH=1.
# Wheels placed in .whl/ (Liger-Kernel, diffusers: pure Python) are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-./gpu_out}}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
JOBS="${JOBS:-8}"
FAMILIES="${BENCH_FAMILIES:-attention,norms,rope,packing}"
t0=$(date +%s)
phase() { echo "== $1 (t+$(( $(date +%s) - t0 )) s)"; }
# limit SECONDS: the phase's own limit, cut to what is left before DEADLINE (at least 1 s).
limit() { local left=$(( ${DEADLINE:-540} - ($(date +%s) - t0) )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi

phase build
FLAGDIT_KERNELS_BUILD_CUDA=1 MAX_JOBS="$JOBS" TORCH_CUDA_ARCH_LIST="9.0" timeout "$(limit "${BUILD_TIMEOUT:-180}")" \
  python3 setup.py build_ext --inplace > "$OUT_DIR/build.log" 2>&1 \
  || { echo "build failed"; tail -30 "$OUT_DIR/build.log"; exit 1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python3 - > "$OUT_DIR/info.json" <<'PY'
import json, torch, triton, flagdit_kernels as fk
info = fk.backend_info()
info.update(device=torch.cuda.get_device_name(), triton_version=triton.__version__, cuda=torch.version.cuda,
            capability=torch.cuda.get_device_capability())
print(json.dumps(info, indent=1, default=str))
PY
head -c 1500 "$OUT_DIR/info.json"; echo

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  phase "warm compile caches ($FAMILIES)"
  # WARM_JOBS processes each hold one family's inputs (up to ~7 GB for attention): 6 fit an 80 GB H100.
  timeout "$(limit "${WARM_TIMEOUT:-150}")" python3 -m flagdit_kernels.bench.warm --jobs "${WARM_JOBS:-6}" \
    --families "$FAMILIES" > "$OUT_DIR/warm.log" 2>&1
  echo "warm rc=$?"; grep -v ": ok (" "$OUT_DIR/warm.log" | grep "^\[warm" | tail -15
fi

tests_rc=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  phase tests
  xdist=()
  python3 -c "import xdist" 2>/dev/null && xdist=(-n "$JOBS")
  FLAGDIT_TEST_DEVICE=cuda timeout "$(limit "${TEST_TIMEOUT:-150}")" python3 -m pytest tests -q -p no:cacheprovider \
    "${xdist[@]}" > "$OUT_DIR/tests.log" 2>&1
  tests_rc=$?
  tail -25 "$OUT_DIR/tests.log"
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  phase benchmarks
  # One pytest run per family, each with its own time limit, so a slow family cannot cost the others their
  # results; the JSON files are merged into one for the report.
  rm -rf /tmp/bench_json && mkdir -p /tmp/bench_json
  : > "$OUT_DIR/bench.log"
  filter=()
  [ -n "${BENCH_FILTER:-}" ] && filter=(-k "$BENCH_FILTER")
  for family in ${FAMILIES//,/ }; do
    phase "benchmarks: $family"
    timeout "$(limit "${BENCH_TIMEOUT:-150}")" python3 -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
      --bench-families "$family" "${filter[@]}" --benchmark-json="/tmp/bench_json/$family.json" \
      --benchmark-columns=median,rounds >> "$OUT_DIR/bench.log" 2>&1
    echo "$family rc=$?"
  done
  python3 - "$OUT_DIR/bench.json" /tmp/bench_json/*.json <<'PY'
import json, os, sys
merged = None
for path in sys.argv[2:]:
    if not os.path.exists(path):  # no family finished: the glob stayed a pattern
        continue
    data = json.load(open(path))
    if merged is None:
        merged = data
    else:
        merged["benchmarks"] += data["benchmarks"]
json.dump(merged or {"benchmarks": []}, open(sys.argv[1], "w"), indent=1)
PY
  python3 -m flagdit_kernels.bench report "$OUT_DIR/bench.json" --md "$OUT_DIR/report.md" \
    --png "$OUT_DIR/roofline.png" && cat "$OUT_DIR/report.md"
fi
phase done
exit "$tests_rc"
