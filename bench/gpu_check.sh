#!/usr/bin/env bash
# The whole GPU check of minunet in 7 minutes, for a lent GPU whose minutes are scarce (15 min of
# device time per session, 2-3 of them to start the machine, at most 600 s per command). The
# stages run most valuable first, so that whatever runs out of time is the least missed:
#   1. setup        the Python stack (CuPy, PyTorch, pytest) is there, else a guarded quick install
#   2. tests        the kernel tests on device cuda (pytest -k cuda: every op, conv3x3 versions,
#                   the GEMM weight gradients, resample, SGD, the captured training step)
#   3. paper_step   python -m minunet.bench, paper network (base 64, tile 572): the training step,
#                   minunet in fp32 and tf32 against PyTorch cuDNN strict FP32 and TF32
#   4. tune         python -m minunet.bench --tune for both networks: the measured choice table
#                   (every conv3x3 version and reduction the code lists, read from the code)
#   5. default      the default network (16, 348): its step and op tables, the step captured once
#                   and replayed as a CUDA graph (--graph), then a 6-second training run with it
#   6. ncu          Nsight Compute's kernel-time breakdown of one paper training step, fp32 and tf32
#   7. paper_ops    the paper network's op and kernel-version table
# Each stage has its own time limit, and none runs past the deadline (420 s from the start); a
# stage that fails or runs out is reported and the next one runs. The budget, in seconds
# (limits from the H200 run of 2026-12-04, plus room for the kernel versions added since):
#   setup 30 | tests 60 | paper_step 70 | tune_paper 40 + tune_default 15 | default 25 + graph 15
#   + train 25 | ncu_fp32 20 + ncu_tf32 20 | paper_ops 35   = 355 of the 420 s deadline (65 s for
#   the summaries between stages and the start of each Python); run it with a 480 s command limit.
# Everything lands in $OUT (8 files at most):
#   summary.txt tests.txt bench_paper.txt bench_default.txt tune.txt cuda_choices.json
#   ncu_fp32.csv ncu_tf32.csv
#
# Usage, from the repository root:
#   OUT=/some/folder bash bench/gpu_check.sh
#   GPU_CHECK_DRY=1 OUT=/tmp/gpu_check bash bench/gpu_check.sh   # dry run: the same commands on
#       the emulator (device emu) at tiny sizes, ncu skipped, limits and deadline x6 (the emulator on a busy CPU;
#       GPU_CHECK_SCALE=12 for x12): catches a typo for free
#   GPU_CHECK_ECHO=1 ...   only lists each stage's command
# Afterwards: copy cuda_choices.json to minunet/backends/ (after reading it) and the tables to
# bench/results/ with the date and the GPU.
set -u
OUT=${OUT:-bench/results/gpu_check}
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # minunet from this checkout, installed or not
START=$(date +%s)

if [ "$DRY" = 1 ]; then
    DEV=emu; SCALE=${GPU_CHECK_SCALE:-6}   # more on a CPU busy with other work
    PAPER="--base-channels 1 --tile 188 --step-tiles 188"      # tiny stand-ins for the two networks
    DEFAULT="--base-channels 2 --tile 188 --step-tiles 188"
    TRAIN="--base-channels 2 --tile 188 --iterations 3 --synthetic-count 2 --synthetic-size 200"
    REPEAT=1
else
    DEV=cuda; SCALE=1
    PAPER="--base-channels 64 --tile 572 --step-tiles 572"
    DEFAULT="--base-channels 16 --tile 348 --step-tiles 348"
    TRAIN="--iterations 300"
    REPEAT=3
fi

say() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME SECONDS LOG COMMAND...: run COMMAND with a time limit (x SCALE, and never past the
# whole check's deadline), its output to LOG (appended), and one line of verdict in the summary.
DEADLINE=$(( START + 420 * SCALE ))   # the budget table at the top
stage() {
    local name=$1 limit=$(( $2 * SCALE )) log=$3; shift 3
    local t0=$(date +%s)
    local left=$(( DEADLINE - t0 ))
    [ $left -lt $limit ] && limit=$left
    if [ "${GPU_CHECK_ECHO:-0}" = 1 ]; then     # list the commands only (tests/test_bench.py)
        echo "stage $name: $*"
        return 0
    fi
    if [ $limit -lt 5 ]; then
        say "$(printf '%-14s %-22s' "$name" "SKIPPED: out of time")"
        return 1
    fi
    echo "\$ $*" >> "$log"
    timeout -k 5 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    local verdict=ok
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="TIMED OUT after ${limit}s"
    [ $rc -ne 0 ] && [ "$verdict" = ok ] && verdict="FAILED (exit $rc)"
    say "$(printf '%-14s %-22s %4ss  (log: %s)' "$name" "$verdict" $(( $(date +%s) - t0 )) "$(basename "$log")")"
    return $rc
}

say "# minunet GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), device $DEV, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.memory --format=csv,noheader >> "$SUMMARY" 2>&1

# 1. setup: what the check needs; installs only what is missing (the lent machines have no
# network: an install there fails within seconds and the check goes on without it).
setup() {
    local want="numpy scipy numba pytest"
    [ "$DEV" = cuda ] && want="$want cupy"
    for module in $want; do
        if ! "$PY" -c "import $module" 2>/dev/null; then
            echo "missing $module: pip install -e .[dev,cuda]"
            "$PY" -m pip install --retries 0 --timeout 5 -q -e ".[dev,cuda]" || echo "install failed"
            break
        fi
    done
    if [ "$DEV" = cuda ] && ! "$PY" -c "import torch" 2>/dev/null; then
        echo "no PyTorch: trying pip install torch (the tables run without it)"
        "$PY" -m pip install --retries 0 --timeout 5 -q torch || echo "no PyTorch: bench runs without its twin"
    fi
    "$PY" -c "import numpy, minunet; print('minunet', minunet.__file__, 'numpy', numpy.__version__)"
    "$PY" -c "import cupy; print('cupy', cupy.__version__, cupy.cuda.runtime.getDeviceCount(), 'GPU(s)')" 2>/dev/null || echo "no cupy"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>/dev/null || echo "no torch"
    # whether each GEMM file got its TF32 tensor-core kernels (CuPy's NVRTC needs the toolkit's <mma.h>)
    "$PY" -c "
from minunet.backends import get_backend, sources
k = get_backend('$DEV')
print('cuda include', sources.cuda_include_dir())
for f in ('conv3x3', 'conv1x1', 'conv_transpose2x2'):
    print('has_tf32', f, k.has_tf32(f))
" 2>&1 || echo "compiling the GEMM kernels FAILED"
}
export PY DEV
export -f setup
stage setup 30 "$SUMMARY" bash -c setup

# 2. the kernel tests on cuda (on emu in a dry run, -k cuda deselects them all: a parse check),
# the captured training step's cuda test (tests/test_step_graph.py) among them
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"
stage tests 60 "$OUT/tests.txt" "$PY" -m pytest -q -p no:cacheprovider $XDIST -k cuda tests/test_kernels.py \
    tests/test_kernels_conv3x3.py tests/test_kernels_wgrad.py tests/test_resample.py tests/test_optim.py \
    tests/test_step_graph.py

# (limits from the H200 run of 2026-12-04: setup compiled the kernels with NVRTC in ~10 s, the
# tests took 34 s, the paper's step tables 50-56 s, its op table 26 s, tune 12 + 3 s, ncu 8 s each;
# the tests, the step tables and the tune have more kernel versions to go through since)

# 3. the headline: the paper's training step against PyTorch in strict FP32 and TF32
stage paper_step 70 "$OUT/bench_paper.txt" "$PY" -m minunet.bench --device $DEV $PAPER --precision both --repeat $REPEAT --save none --no-ops

# 4. the measured choice table, one network after the other (merged into one file); the versions
# and reductions it times are the ones the code lists (minunet.backends.choices), none named here
rm -f "$OUT/cuda_choices.json"
stage tune_paper 40 "$OUT/tune.txt" "$PY" -m minunet.bench --device $DEV --tune $PAPER --repeat $REPEAT --tune-output "$OUT/cuda_choices.json"
stage tune_default 15 "$OUT/tune.txt" "$PY" -m minunet.bench --device $DEV --tune $DEFAULT --repeat $REPEAT --tune-output "$OUT/cuda_choices.json"

# 5. the default network: its step and op tables, then the step captured once as a CUDA graph and
# replayed (minunet.step_graph, train --graph; its cuda test ran in stage 2): the "training step
# (graph replay)" row beside the bare step
stage default 25 "$OUT/bench_default.txt" "$PY" -m minunet.bench --device $DEV $DEFAULT --precision both --repeat $REPEAT --save none
stage graph 15 "$OUT/bench_default.txt" "$PY" -m minunet.bench --device $DEV $DEFAULT --graph --no-ops --no-torch --repeat $REPEAT --save none

# 5b. a short training run end to end on the device, its step captured and replayed (--graph; the
# eager training iteration is in the default stage's table): augmentation on the GPU, the prefetch
# thread's stream working during the capture, validation (its log's data/step ms go to the
# summary; a capture that failed is a "warning: capturing ..." line there, and the run goes on)
train_run() {
    rm -rf /tmp/gpu_check_run
    "$PY" -m minunet.train --device $DEV $TRAIN --graph --max-minutes 0.1 --out /tmp/gpu_check_run --quiet &&
        "$PY" -c "
import csv, statistics
every = list(csv.DictReader(open('/tmp/gpu_check_run/log.csv')))
rows = every[3:] or every   # past the first steps (compiles, warm-up)
print('train:', len(every), 'iterations; median data ms', statistics.median(float(r['data_ms']) for r in rows),
      'step ms', statistics.median(float(r['step_ms']) for r in rows))
print(open('/tmp/gpu_check_run/metrics.json').read())"
}
export TRAIN; export -f train_run
stage train 25 "$SUMMARY" bash -c train_run

# 6. ncu: one paper training step (the last of two), per kernel; --clock-control none keeps the
# GPU's own clocks (the 2026-12-04 files used ncu's base clocks: up to 1.3x longer)
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
[ "${GPU_CHECK_ECHO:-0}" = 1 ] && NCU=${NCU:-ncu}
if [ "$DRY" = 1 ]; then
    say "ncu            skipped in a dry run; the summary of the H200's ncu16.csv instead:"
    "$PY" -c "from minunet.bench import summarize_ncu; print(summarize_ncu('bench/results/h200-2026-12-04/ncu16.csv', top=5))" >> "$SUMMARY" 2>&1
elif [ -z "$NCU" ]; then
    say "ncu            not found: no kernel breakdown"
else
    for precision in fp32 tf32; do
        stage "ncu_$precision" 20 "$OUT/ncu_$precision.csv" env MINUNET_PRECISION=$precision "$NCU" \
            --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
            "$PY" bench/results/h200-2026-12-04/ncu_steps.py 64 572 2
        "$PY" -c "from minunet.bench import summarize_ncu; print(summarize_ncu('$OUT/ncu_$precision.csv'))" >> "$SUMMARY" 2>&1
    done
fi

# 7. last, the least missed: the paper network's op and kernel-version table
stage paper_ops 35 "$OUT/bench_paper.txt" "$PY" -m minunet.bench --device $DEV $PAPER --precision both --repeat $REPEAT --save none --no-step

# the headline: the training-step lines of both tables
say ""
say "## training steps"
grep -h "^## training step\|^training step \|^minunet \(fp32\|tf32\):" "$OUT/bench_paper.txt" \
    "$OUT/bench_default.txt" 2>/dev/null | tee -a "$SUMMARY"
say "total $(( $(date +%s) - START ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
