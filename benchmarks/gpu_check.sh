#!/usr/bin/env bash
# GPU check sized for a short device window: returns whatever it measured, however it ends.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]              smoke, benchmarks in plan order, tests (about 7 min)
#   bash benchmarks/gpu_check.sh --sanitize [OUT_DIR]   smoke, then compute-sanitizer memcheck + racecheck
#   bash benchmarks/gpu_check.sh --dry-run [OUT_DIR]    the same orchestration on a CPU (interpreter, tiny shapes)
#   options: --phases smoke,warm,sanitize,attention,memory,bench,tests (a subset, always run in this order;
#            memory only when named)
#
# Phases, in order of information per second (budgets in seconds; DEADLINE, default 420, caps the sum, so a
# second, shorter run, --sanitize say, fits the same 15-minute lease with the machine's start):
#   prep       10  wheels from .whl/, nvidia-smi, the CUDA extension build started in the background
#                  (BUILD_BUDGET 240; only the cases that need the extension wait for it)
#   smoke      60  tests/test_smoke_gluon.py first (every Gluon kernel against the float64 reference, sm_90
#                  only; also with non-finite keys/values in the rows a tail tile reads past its sequence, and
#                  with scores that grow along the sequence for the lazy rescale), then tests/test_smoke.py: one tiny fwd+bwd of every op on every Triton backend against
#                  the float64 reference, bf16 and fp32; at the same time
#   warm       60  flagdit-bench warm --plan: compile caches for the timed pairs, plan order
#   sanitize  200  (--sanitize) compute-sanitizer memcheck on every smoke case (Triton and CUDA, every tile:
#                  FLAGDIT_KERNELS_AUTOTUNE=compile), racecheck on the attention cases; errors counted
#   attention 100  plan group attention: packed D128 self / text, fwd and fwd+bwd, autotuner timings per
#                  config; D72 GQA; dense Triton vs SDPA flash; the fused Lumina chain
#   memory     90  (only when named) python -m flagdit.parallel.measure: one Flag-DiT 7B block, bf16, forward +
#                  backward at 16K and 32K tokens in each checkpointing mode: the bytes autograd saved
#                  and the peak allocated against flagdit.parallel.plan.one_block (kind "memory" records)
#   bench     135  plan groups bandwidth (60: RMSNorm 32768 x {4096, 2304}, packed norms, RoPE, packing, embed,
#                  every baseline that needs no compile), baselines (45: FlexAttention, cuDNN, padded SDPA,
#                  Lumina eager / torch.compile), model (30: the Flag-DiT 600M step) in one process
#   tests      90  the test suite on CUDA (bf16 included; the CUDA smoke cases first)
#   report     20  flagdit-bench report: report.md, roofline.png, RESULTS.md with this run's figures
# Every test and benchmark appends one JSON line to OUT_DIR/results.jsonl the moment it finishes
# (benchmarks/results_log.py), so a time limit or kill loses only the case in flight. A phase runs under
# `timeout -s INT`; a benchmark case running past CASE_TIMEOUT (120 s) is stopped and its phase resumes with
# the next case, as after a crash. At most 8 files under OUT_DIR: results.jsonl, run.log, build.log,
# sanitizer.log (--sanitize), report.md, roofline.png, RESULTS.md.
# Knobs: DEADLINE, BUDGET_<PHASE> (BUDGET_BANDWIDTH / _BASELINES / _MODEL split the bench phase), BUILD_BUDGET,
# CASE_TIMEOUT, PYTHON (default python3), JOBS (xdist workers), WARM_JOBS, BENCH_FAMILIES, SMOKE_SELECT (-k),
# TESTS_ARGS, COMPUTE_SANITIZER, MEMORY_ARGS.
# Liger-Kernel (a baseline) is not in the device image: put its wheel in .whl/ (benchmarks/RESULTS.md says how).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY_RUN=0 SANITIZE=0 PHASES="" OUT_DIR=""
while (($#)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --sanitize) SANITIZE=1 ;;
    --phases) PHASES=$2; shift ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
    *) OUT_DIR=$1 ;;
  esac
  shift
done
OUT_DIR=${OUT_DIR:-${OUT:-./gpu_out}}
if [ -z "$PHASES" ]; then
  PHASES=$( ((SANITIZE)) && echo smoke,sanitize || echo smoke,warm,attention,bench,tests)
fi
((SANITIZE)) && [[ ,$PHASES, != *,sanitize,* ]] && PHASES+=",sanitize"
wants() { [[ ,$PHASES, == *,$1,* ]]; }

if ((DRY_RUN)); then
  # CPU: Triton through its interpreter, small shapes, the dry-run plan (no torch.compile), short budgets.
  export TRITON_INTERPRET=1 FLAGDIT_TEST_DEVICE=cpu
  : "${DEADLINE:=400}" "${BUDGET_PREP:=5}" "${BUDGET_SMOKE:=60}" "${BUDGET_WARM:=60}" "${BUDGET_SANITIZE:=60}"
  : "${BUDGET_ATTENTION:=40}" "${BUDGET_BANDWIDTH:=150}" "${BUDGET_BASELINES:=30}" "${BUDGET_MODEL:=15}"
  : "${BUDGET_TESTS:=40}" "${BUDGET_REPORT:=30}" "${CASE_TIMEOUT:=5}" "${JOBS:=1}" "${WARM_JOBS:=1}"
  : "${BENCH_FAMILIES:=packing}"
  : "${SMOKE_SELECT:=rms_norm-cpu or pack-cpu}" "${TESTS_ARGS:=tests/test_smoke.py -k unpack-cpu}"
  : "${BUDGET_MEMORY:=60}" "${MEMORY_ARGS:=--config tiny --tokens 64 --backend reference}"
  PLAN_SET=dry-run SIZE=--bench-quick WARM_SIZE=--quick MIN_PHASE=2
else
  export FLAGDIT_TEST_DEVICE=cuda
  : "${DEADLINE:=420}" "${BUDGET_PREP:=10}" "${BUDGET_SMOKE:=60}" "${BUDGET_WARM:=60}" "${BUDGET_SANITIZE:=200}"
  : "${BUDGET_ATTENTION:=100}" "${BUDGET_BANDWIDTH:=60}" "${BUDGET_BASELINES:=45}" "${BUDGET_MODEL:=30}"
  : "${BUDGET_TESTS:=90}" "${BUDGET_REPORT:=20}" "${CASE_TIMEOUT:=120}" "${JOBS:=8}" "${WARM_JOBS:=8}"
  : "${BENCH_FAMILIES:=attention,norms,rope,packing,model,diffusers_lumina}"
  : "${SMOKE_SELECT:=}" "${TESTS_ARGS:=tests/test_smoke.py tests}"
  : "${BUDGET_MEMORY:=90}" "${MEMORY_ARGS:=--config flag-dit-7b --tokens 16384,32768}"
  PLAN_SET=gpu SIZE="" WARM_SIZE="" MIN_PHASE=10
fi
: "${BUILD_BUDGET:=240}"
BUDGET_BENCH=$((BUDGET_BANDWIDTH + BUDGET_BASELINES + BUDGET_MODEL))
families=() # the benchmark families this checkout has (modules of flagdit_kernels.bench.cases.FAMILY_PACKAGES)
for f in ${BENCH_FAMILIES//,/ }; do
  [ -f "flagdit_kernels/bench/families/$f.py" ] || [ -f "flagdit/bench/$f.py" ] && families+=("$f")
done
BENCH_FAMILIES=$(IFS=,; echo "${families[*]}")
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT/benchmarks:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG=$OUT_DIR/results.jsonl RUNLOG=$OUT_DIR/run.log
rm -f "$LOG" "$RUNLOG" "$OUT_DIR"/{build.log,sanitizer.log,report.md,roofline.png,RESULTS.md}
STATE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$STATE"' EXIT
t0=$(date +%s)
elapsed() { echo $(($(date +%s) - t0)); }
say() { echo "== [t+$(elapsed) s] $*" | tee -a "$RUNLOG"; }
record() { echo "$1" >> "$LOG"; } # one JSON object per line (one short write: whole lines)
jstr() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '"%s"' "${s//$'\n'/ }"; }

# The budget table, also as the first record (the dry-run test checks that the budgets fit the deadline).
budgets=(prep "$BUDGET_PREP" smoke "$BUDGET_SMOKE" warm "$BUDGET_WARM" sanitize "$BUDGET_SANITIZE"
  attention "$BUDGET_ATTENTION" memory "$BUDGET_MEMORY" bench "$BUDGET_BENCH" tests "$BUDGET_TESTS"
  report "$BUDGET_REPORT")
plan_json="" sum=0 table=""
for ((i = 0; i < ${#budgets[@]}; i += 2)); do
  name=${budgets[i]} budget=${budgets[i + 1]}
  [ "$name" = prep ] || [ "$name" = report ] || wants "$name" || continue
  [ "$name" = warm ] && wants smoke || sum=$((sum + budget)) # warm runs beside smoke, inside its window
  plan_json+="${plan_json:+,}{\"phase\":\"$name\",\"budget_s\":$budget}"
  table+=$(printf '   %-10s %4s s' "$name" "$budget")$'\n'
done
record "{\"kind\":\"plan\",\"t\":$t0,\"deadline_s\":$DEADLINE,\"budget_sum_s\":$sum,\"dry_run\":$DRY_RUN,\"phases\":[$plan_json]}"
say "gpu_check: phases $PHASES; budgets add up to $sum s of the $DEADLINE s deadline; output in $OUT_DIR"
printf '%s' "$table" | tee -a "$RUNLOG"
((sum <= DEADLINE)) || say "warning: the budgets exceed DEADLINE; the later phases get what is left"

# run_phase NAME BUDGET CMD...: CMD under `timeout -s INT`, its limit the budget cut to what is left before the
# deadline (less the report's share); a benchmark case in flight past CASE_TIMEOUT is stopped (the INT that
# timeout would send). Sets PHASE_RC; records the phase.
run_phase() {
  local name=$1 budget=$2 start left limit pid rc since note=""
  shift 2
  left=$((DEADLINE - $(elapsed) - BUDGET_REPORT))
  if ((left < MIN_PHASE)); then
    record "{\"kind\":\"phase\",\"name\":\"$name\",\"budget_s\":$budget,\"limit_s\":0,\"rc\":null,\"note\":\"skipped: deadline\"}"
    say "$name: skipped, ${left} s left before the deadline"
    PHASE_RC=124
    return
  fi
  limit=$((budget < left ? budget : left))
  say "$name (limit $limit s): $*"
  start=$(date +%s)
  rm -f "$STATE/inflight"
  timeout -s INT -k 10 "$limit" "$@" >> "$RUNLOG" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 0.5
    since=$(stat -c %Y "$STATE/inflight" 2> /dev/null || date +%s) # the case in flight started then
    if (($(date +%s) - since > CASE_TIMEOUT)); then
      note="stopped a case in flight past CASE_TIMEOUT ($CASE_TIMEOUT s)"
      record "{\"kind\":\"hung\",\"phase\":\"$name\",\"t\":$(date +%s),\"test\":$(jstr "$(cat "$STATE/inflight")")}"
      say "$name: $note: $(cat "$STATE/inflight")"
      rm -f "$STATE/inflight"
      kill -INT "$pid" 2>/dev/null # timeout passes it on to the command's process group
    fi
  done
  wait "$pid"
  rc=$?
  local json="{\"kind\":\"phase\",\"name\":\"$name\",\"t\":$(date +%s),\"budget_s\":$budget,\"limit_s\":$limit"
  record "$json,\"elapsed_s\":$(($(date +%s) - start)),\"rc\":$rc,\"note\":$(jstr "$note")}"
  say "$name: exit $rc after $(($(date +%s) - start)) s${note:+ ($note)}"
  PHASE_RC=$rc
  [ -z "$note" ] || PHASE_RC=75 # a stopped case: resumable, like a lost CUDA context (exit 2) or a crash
}

PYTEST=("$PY" -m pytest -p results_log --results-jsonl "$LOG" --results-fast-exit -p no:cacheprovider -q)

# bench_phase NAME BUDGET FAMILIES GROUPS: the plan groups in one pytest process. After a stopped case, a lost
# CUDA context (benchmarks/conftest.py stops the run: exit 2) or a crash (abort, segfault) the phase goes on in
# a new process with the cases not yet started there (--bench-resume), while its budget lasts.
bench_phase() {
  local name=$1 budget=$2 families=$3 groups=$4 start attempt spent
  start=$(date +%s)
  for attempt in 1 2 3 4; do
    spent=$(($(date +%s) - start))
    ((budget - spent >= MIN_PHASE)) || break
    # shellcheck disable=SC2086
    run_phase "$name" $((budget - spent)) "${PYTEST[@]}" --results-phase "$name" --results-inflight \
      "$STATE/inflight" benchmarks --benchmark-only --benchmark-columns=median,rounds $SIZE \
      --bench-families "$families" \
      --bench-plan "$groups" --bench-plan-set "$PLAN_SET" --bench-plan-start "$start" --bench-resume "$LOG"
    case $PHASE_RC in
      2 | 75 | 134 | 135 | 136 | 139) say "$name: resuming with the cases not yet started (attempt $((attempt + 1)))" ;;
      *) break ;;
    esac
  done
}

# The CUDA extension, built beside the tree and moved in with one rename (a process that imports
# flagdit_kernels meanwhile sees no extension, never half a file); $STATE/build.rc holds the exit status. A warm
# machine keeps ignored files between calls: an extension built there from the same sources is kept.
build_extension() {
  local so rc sources
  sources=$(cat setup.py csrc/* 2> /dev/null | sha1sum | cut -d' ' -f1)
  so=flagdit_kernels/_C$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  if ((DRY_RUN)); then # the extension built for the CPU tests is already here
    sleep 1
    compgen -G "flagdit_kernels/_C*.so" > /dev/null
    rc=$?
    echo "dry run: the CPU extension is $( ((rc)) && echo missing || echo present)" > "$OUT_DIR/build.log"
  elif [ -f "$so" ] && [ "$(cat "$so.sources" 2> /dev/null)" = "$sources" ]; then
    rc=0
    echo "kept $so, built by an earlier run on this machine from the same sources" > "$OUT_DIR/build.log"
  else
    FLAGDIT_KERNELS_BUILD_CUDA=1 MAX_JOBS=4 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
      timeout -s INT -k 10 "$BUILD_BUDGET" "$PY" setup.py build_ext --build-lib "$STATE/ext/lib" \
      --build-temp "$STATE/ext/tmp" > "$OUT_DIR/build.log" 2>&1 &
    echo $! > "$STATE/build.pid"
    wait $!
    rc=$?
    built=$STATE/ext/lib/$so
    if ((rc == 0)) && [ -f "$built" ]; then
      { cp "$built" "$so.part" && mv -f "$so.part" "$so" && echo "$sources" > "$so.sources"; } || rc=97
    elif ((rc == 0)); then
      rc=96 && echo "no $built after the build" >> "$OUT_DIR/build.log"
    fi
  fi
  record "{\"kind\":\"build\",\"t\":$(date +%s),\"rc\":$rc,\"elapsed_s\":$(elapsed)}"
  echo "$rc" > "$STATE/build.rc"
}

wait_build() { # wait_build SECONDS: until the build has finished or the time is up
  local until=$(($(date +%s) + $1))
  while [ ! -f "$STATE/build.rc" ] && (($(date +%s) < until)); do sleep 1; done
  if [ -f "$STATE/build.rc" ]; then
    local rc
    rc=$(cat "$STATE/build.rc")
    say "extension build: exit $rc$( ((rc)) && echo ' (the cuda backends are missing: see build.log)')"
  else
    say "extension build: still running; going on without the cuda backends"
  fi
}

# ---- prep ------------------------------------------------------------------------------------------------
say "prep"
if compgen -G ".whl/*.whl" > /dev/null; then
  if timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >> "$RUNLOG" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
    say "installed $(ls .whl | tr '\n' ' ')"
  else
    say "installing .whl/ failed (see run.log); going on without those packages"
  fi
fi
if command -v nvidia-smi > /dev/null; then
  query=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw
  smi=$(timeout 10 nvidia-smi --query-gpu="$query" --format=csv,noheader 2>&1 | head -1)
  record "{\"kind\":\"nvidia-smi\",\"t\":$(date +%s),\"line\":$(jstr "$smi")}"
  say "nvidia-smi: $smi"
fi
build_extension &

# ---- smoke beside warm -----------------------------------------------------------------------------------
if wants smoke || wants warm; then
  xdist=() # half the cores beside warm; all of them when compiling every tile for the sanitizer
  workers=$( ((SANITIZE)) && echo "$JOBS" || echo $((JOBS / 2)))
  ((JOBS > 1)) && "$PY" -c "import xdist" 2> /dev/null && xdist=(-n "$workers")
  smoke_env=()
  # Under --sanitize the smoke run compiles every attention tile (the sanitizer then finds them in the cache).
  ((SANITIZE)) && smoke_env=(env FLAGDIT_KERNELS_AUTOTUNE=compile)
  select=()
  [ -n "$SMOKE_SELECT" ] && select=(-k "$SMOKE_SELECT")
  if wants smoke; then
    # Every Gluon kernel against the float64 reference first, in a process of its own (a faulting kernel must
    # not take the other cases with it; skipped off sm_90), then the smoke cases. The phase fails if either does.
    base=("${PYTEST[@]}" --results-phase smoke)
    # shellcheck disable=SC2016
    run_phase smoke "$BUDGET_SMOKE" "${smoke_env[@]}" bash -c 'n=$1; shift
      "${@:1:n}" tests/test_smoke_gluon.py; gluon=$?
      "${@:1:n}" "${@:n+1}"; rc=$?
      ((gluon == 0 || gluon == 5)) || rc=$gluon; exit $rc' _ "${#base[@]}" "${base[@]}" "${xdist[@]}" \
      tests/test_smoke.py "${select[@]}" &
    smoke_pid=$!
  fi
  if wants warm; then
    # shellcheck disable=SC2086
    run_phase warm "$BUDGET_WARM" "$PY" -m flagdit_kernels.bench warm --jobs "$WARM_JOBS" --families \
      "$BENCH_FAMILIES" --plan attention,bandwidth,baselines,model --plan-set "$PLAN_SET" $WARM_SIZE
  fi
  [ -n "${smoke_pid:-}" ] && wait "$smoke_pid"
fi

# ---- compute-sanitizer -----------------------------------------------------------------------------------
if wants sanitize; then
  sanitizer=${COMPUTE_SANITIZER:-compute-sanitizer}
  wait_build $((BUILD_BUDGET - $(elapsed))) # the CUDA kernels are part of the workload
  if command -v "$sanitizer" > /dev/null; then
    # Every tile of every attention kernel (compile mode runs each config once); one cudaMalloc per tensor so
    # that an access past a tensor's end leaves its allocation (PyTorch's caching allocator would hide it).
    san_env=(env FLAGDIT_KERNELS_AUTOTUNE=compile PYTORCH_NO_CUDA_MEMORY_CACHING=1)
    sel_all=$( ((DRY_RUN)) && echo "rms_norm-cpu" || echo "bfloat16")
    sel_race=$( ((DRY_RUN)) && echo "varlen_attention-D64" || echo "varlen_attention and bfloat16")
    half=$((BUDGET_SANITIZE * 3 / 5))
    run_phase sanitize-memcheck "$half" "${san_env[@]}" "$sanitizer" --tool memcheck --print-limit 100 \
      --log-file "$STATE/memcheck.log" "${PYTEST[@]}" --results-phase sanitize-memcheck tests/test_smoke.py \
      -k "$sel_all"
    "$PY" benchmarks/sanitizer_summary.py "$STATE/memcheck.log" --tool memcheck --rc "$PHASE_RC" --jsonl "$LOG" \
      --phase sanitize-memcheck | tee -a "$RUNLOG"
    run_phase sanitize-racecheck "$((BUDGET_SANITIZE - half))" "${san_env[@]}" "$sanitizer" --tool racecheck \
      --print-limit 100 --log-file "$STATE/racecheck.log" "${PYTEST[@]}" --results-phase sanitize-racecheck \
      tests/test_smoke.py -k "$sel_race"
    "$PY" benchmarks/sanitizer_summary.py "$STATE/racecheck.log" --tool racecheck --rc "$PHASE_RC" \
      --jsonl "$LOG" --phase sanitize-racecheck | tee -a "$RUNLOG"
    for tool in memcheck racecheck; do
      [ -f "$STATE/$tool.log" ] || continue
      { echo "==== $tool"; head -c 4000000 "$STATE/$tool.log"; } >> "$OUT_DIR/sanitizer.log"
    done
  else
    record "{\"kind\":\"sanitizer\",\"phase\":\"sanitize-memcheck\",\"tool\":\"memcheck\",\"errors\":null,\"note\":\"$sanitizer not found\"}"
    say "sanitize: $sanitizer not found"
  fi
fi

# ---- benchmarks ------------------------------------------------------------------------------------------
wants attention && bench_phase attention "$BUDGET_ATTENTION" attention "attention=$BUDGET_ATTENTION"
# shellcheck disable=SC2086
wants memory && run_phase memory "$BUDGET_MEMORY" "$PY" -m flagdit.parallel.measure $MEMORY_ARGS --jsonl "$LOG"
if wants bench; then
  wait_build $((BUILD_BUDGET - $(elapsed) < 30 ? BUILD_BUDGET - $(elapsed) : 30)) # the cuda backends' cases
  bench_phase bench "$BUDGET_BENCH" "$BENCH_FAMILIES" \
    "bandwidth=$BUDGET_BANDWIDTH,baselines=$BUDGET_BASELINES,model=$BUDGET_MODEL"
fi

# ---- tests -----------------------------------------------------------------------------------------------
if wants tests; then
  wait_build $((BUILD_BUDGET - $(elapsed)))
  xdist=()
  ((JOBS > 1)) && "$PY" -c "import xdist" 2> /dev/null && xdist=(-n "$JOBS")
  # shellcheck disable=SC2086
  run_phase tests "$BUDGET_TESTS" env FLAGDIT_KERNELS_AUTOTUNE=0 "${PYTEST[@]}" --results-phase tests \
    "${xdist[@]}" $TESTS_ARGS
fi

# ---- report ----------------------------------------------------------------------------------------------
# A build still running is of no more use (timeout passes the INT on to the compilers).
[ -f "$STATE/build.rc" ] || { kill -INT "$(cat "$STATE/build.pid" 2> /dev/null)" 2> /dev/null; wait; }
say "report"
timeout -s INT -k 5 "$BUDGET_REPORT" "$PY" -m flagdit_kernels.bench report "$LOG" --md "$OUT_DIR/report.md" \
  --png "$OUT_DIR/roofline.png" --record benchmarks/RESULTS.md --record-out "$OUT_DIR/RESULTS.md" >> "$RUNLOG" 2>&1
report_rc=$?
files=$(find "$OUT_DIR" -type f | wc -l)
say "done: $files files in $OUT_DIR (report exit $report_rc)"
if [ -f "$OUT_DIR/report.md" ]; then
  # What the device tool's output tail shows: ours against the best baseline per case, then the run (phases,
  # cases cut off, failures, sanitizer counts). The per-op record is in RESULTS.md, the rest in report.md.
  sed -n '/^## Summary/,/^## Every implementation/p' "$OUT_DIR/report.md" | sed '$d'
  sed -n '/^## Run/,/^## /p' "$OUT_DIR/report.md" | sed '$d'
fi
[ -f "$OUT_DIR/report.md" ] # the report exits 1 when no benchmark ran (a --sanitize run), and still writes
