#!/usr/bin/env bash
# GPU check: build the CUDA extension, run the test suite on CUDA (bf16 included), then the benchmarks.
# Usage (on a GPU machine, no internet, the device image's torch/triton):  bash benchmarks/gpu_check.sh [OUT_DIR]
# Writes under OUT_DIR (default $OUT, else ./gpu_out): build.log, info.json, tests.log, bench.json, bench.log,
# report.md and roofline.png (from `flagdit-bench report`). Time limits: TEST_TIMEOUT, BENCH_TIMEOUT (seconds);
# BENCH_FILTER narrows the benchmarks with pytest -k.
# Optional wheels (e.g. Liger-Kernel, pure Python) placed in .whl/ are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-./gpu_out}}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

# Build in place (no dependency resolution: the image has torch, triton, pybind11, ninja, nvcc).
start=$(date +%s)
FLAGDIT_KERNELS_BUILD_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="9.0" python3 setup.py build_ext --inplace \
  > "$OUT_DIR/build.log" 2>&1 || { echo "build failed"; tail -30 "$OUT_DIR/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python3 - > "$OUT_DIR/info.json" <<'PY'
import json, torch, triton, flagdit_kernels as fk
info = fk.backend_info()
info.update(triton_version=triton.__version__, cuda=torch.version.cuda, capability=torch.cuda.get_device_capability())
print(json.dumps(info, indent=1, default=str))
PY
cat "$OUT_DIR/info.json"

# Tests on CUDA (helpers.DEVICE picks cuda; kernel tests add bf16 there).
FLAGDIT_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-240}" python3 -m pytest tests -q -x -p no:cacheprovider \
  2>&1 | tee "$OUT_DIR/tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

# Benchmarks: pytest-benchmark JSON (figures in extra_info), then the Markdown table and the chart from it.
timeout "${BENCH_TIMEOUT:-300}" python3 -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
  ${BENCH_FILTER:+-k "$BENCH_FILTER"} --benchmark-json="$OUT_DIR/bench.json" --benchmark-columns=median,rounds \
  > "$OUT_DIR/bench.log" 2>&1
echo "pytest benchmarks rc=$?"
python3 -m flagdit_kernels.bench report "$OUT_DIR/bench.json" --md "$OUT_DIR/report.md" --png "$OUT_DIR/roofline.png"
cat "$OUT_DIR/report.md" | head -80
exit "$tests_rc"
