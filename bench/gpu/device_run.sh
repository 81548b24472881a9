#!/usr/bin/env bash
# One pass on a GPU machine (H100/H200), ordered for a short lease and held to a deadline:
#   1. the toy source trains on the GPU in the background (from a copy of the Python package,
#      so the in-place build cannot change what it imports) while
#   2. l2p is built with its CUDA kernels in place, the op tests run on CPU and CUDA, and a
#      compute-sanitizer memcheck smoke run checks every kernel;
#   3. once the GPU is quiet again: the CUDA op benchmarks (l2p and torch in the same run; the
#      unpatchify ways also interleaved round by round),
#      the pixel vs latent sampling benchmark up to 16K (issue 7), block offload against the
#      resident transformer (bench/test_bench_offload.py) and, if time is left, the
#      trainer's peak memory on an SD3-Medium-sized source (issue 6).
# Each step gets what is left of DEADLINE_S (seconds from the start); steps that no longer fit
# are skipped and say so. Results land in $OUT as few files (the device tool brings back at
# most 8): run.log, cuda_report.md, unpatchify_ab.md, logs.tgz (build, tests, memcheck, toy, sampling, peak
# memory logs and JSON) and the toy sources as one tarball split into 15 MB parts.
# Usage (repo root): OUT=/some/dir [DEADLINE_S=540] [TOY=0] [TOY_BUDGET_S=220] [TOY_ARGS="..."] \
#   [REPRODUCE="args|args"] [TESTS="pytest paths"] [MEMCHECK=0] [BENCH=0] [CHUNKS=1] [HOST=1] \
#   [PROFILE=1] [SAMPLING=0] [OFFLOAD=0] [PEAK=0] bash bench/gpu/device_run.sh
# REPRODUCE runs `l2p toy reproduce` once per '|'-separated argument list, each in the background
# from the start (like the toy source) into /tmp/reproduce-<k>; their reports, scores and logs
# come back in reproduce.tgz, and the final l2p-align pipeline of the last one in reproduce-model.tgz.
# They are stopped REPRODUCE_RESERVE_S (default 90) seconds before the deadline if still running.
# TESTS narrows the GPU test run to the given pytest paths; CHUNKS=1 times the general patch ops
# at several chunk sizes (bench/gpu/patch_chunks_ab.py); HOST=1 the host time per call of each op at
# tiny shapes against torch's (bench/test_bench_host_overhead.py, host_overhead.md; the cases matching
# HOST_FILTER, default "cuda").
# PROFILE=1 adds Nsight Compute counters of the unpatchify kernels (bench/gpu/profile_unpatchify.py).
# TOY_ARGS="--init-from python/l2p/toy/weights/shapes-pixart --dit-batch 256" continues the
# shipped source (same architecture, its autoencoder kept) instead of training a new one;
# TOY_ARGS="A|B" trains one source per argument list, side by side (/tmp/toy-source-<k>).
set -u
OUT=${OUT:-/tmp/l2p-device-out}
DEADLINE_S=${DEADLINE_S:-540}
TOY_BUDGET_S=${TOY_BUDGET_S:-220}
LOGS=/tmp/l2p-logs
START=$(date +%s)
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1
log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/run.log"; }
left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }
# Run "$@" with at most min(cap, time left - reserve) seconds; skip it when under 20 remain.
within() {
  local cap=$1 reserve=$2; shift 2
  local t=$(( $(left) - reserve )); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 20 ]; then log "skipped (no time left): $*"; return 124; fi
  timeout "$t" "$@"
}
pack_logs() { tar -C "$LOGS" -czf "$OUT/logs.tgz" . 2>/dev/null; }

# .whl/ (ignored by git; pass it in the device tool's carry) holds the wheels the GPU image
# lacks: `pip download --no-deps diffusers==0.42.1 importlib_metadata zipp nvidia-cutlass==4.2.0.0`.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
  | tee -a "$OUT/run.log"

TOY_PIDS=()
if [ "${TOY:-1}" = 1 ]; then
rm -rf /tmp/toy-pkg && cp -r python /tmp/toy-pkg
# TOY_ARGS may hold several '|'-separated argument lists: one training run each, side by side
# (a toy source leaves most of the GPU idle), into /tmp/toy-source-<k>.
IFS='|' read -ra TOY_RUNS <<< "${TOY_ARGS:- }"
for k in "${!TOY_RUNS[@]}"; do
  log "toy source $k: training in the background (budget ${TOY_BUDGET_S}s): ${TOY_RUNS[$k]}"
  ( PYTHONPATH="/tmp/toy-pkg:${PYTHONPATH:-}" python3 -c "import argparse, sys
from l2p.cli import toy
parser = argparse.ArgumentParser(prog='l2p'); toy.register(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:]); sys.exit(args.func(args))" \
      toy train-source --out "/tmp/toy-source-$k" --device cuda --time-budget-s "$TOY_BUDGET_S" \
      --eval-prompts 600 ${TOY_RUNS[$k]} > "$LOGS/toy-$k.log" 2>&1; echo "exit $?" >> "$LOGS/toy-$k.log" ) &
  TOY_PIDS+=($!)
done
fi
REPRODUCE_PIDS=()
if [ -n "${REPRODUCE:-}" ]; then
  rm -rf /tmp/reproduce-pkg && cp -r python /tmp/reproduce-pkg
  IFS='|' read -ra REPRODUCE_RUNS <<< "$REPRODUCE"
  for k in "${!REPRODUCE_RUNS[@]}"; do
    log "toy reproduce $k in the background: ${REPRODUCE_RUNS[$k]}"
    ( PYTHONPATH="/tmp/reproduce-pkg:${PYTHONPATH:-}" python3 -m l2p toy reproduce \
        --out "/tmp/reproduce-$k" ${REPRODUCE_RUNS[$k]} > "$LOGS/reproduce-$k.log" 2>&1
      echo "exit $?" >> "$LOGS/reproduce-$k.log" ) &
    REPRODUCE_PIDS+=($!)
  done
fi
export PYTHONPATH="$PWD/python:${PYTHONPATH:-}"

# The image's default C++ compiler (/opt/gcc/bin/g++) links libstdc++ statically, which makes the
# extension crash on its own error messages (tests/test_extension_build.py); the distribution's
# compiler links it dynamically.
[ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
log "build in place (L2P_CUDA=1, sm_90a, CXX=${CXX:-default})"
ok=0
within 300 60 env L2P_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0a" MAX_JOBS=16 \
  python3 setup.py build_ext --inplace > "$LOGS/build.log" 2>&1 && ok=1
if [ $ok = 1 ]; then
  log "build ok"
  python3 -m l2p info 2>&1 | tee -a "$OUT/run.log"
  log "op tests (CPU and CUDA, 8 processes)"
  within 200 120 python3 -m pytest ${TESTS:-tests/test_extension_build.py tests/ops/test_cuda_ops.py \
    tests/ops/test_patch_ops.py tests/ops/test_attention.py tests/ops/test_fused_unpatchify_epilogue.py \
    tests/train/test_cuda.py tests/sample/test_attention_routing.py tests/sample/test_offload.py tests/sample/test_quantize.py tests/test_info.py} \
    -q -rfE -p no:cacheprovider -n 8 > "$LOGS/tests.log" 2>&1
  log "tests exit $? :: $(tail -1 "$LOGS/tests.log")"
  grep -E "^(FAILED|ERROR)" "$LOGS/tests.log" | head -20 | tee -a "$OUT/run.log"
  if [ "${MEMCHECK:-1}" = 1 ]; then
    log "compute-sanitizer memcheck smoke run"
    within 90 120 compute-sanitizer --tool memcheck --error-exitcode 99 \
      python3 bench/gpu/memcheck_smoke.py > "$LOGS/memcheck.log" 2>&1
    log "memcheck exit $? :: $(grep -E 'ERROR SUMMARY|smoke' "$LOGS/memcheck.log" | tail -2 | tr '\n' ' ')"
  fi
else
  log "BUILD FAILED"; grep -E "error|Error" "$LOGS/build.log" | head -30 | tee -a "$OUT/run.log"
fi
pack_logs

for k in "${!TOY_PIDS[@]}"; do
  log "waiting for toy source $k"
  wait "${TOY_PIDS[$k]}"
  grep -E "step .*/|overall|exit|written" "$LOGS/toy-$k.log" | tail -8 | tee -a "$OUT/run.log"
  cp "/tmp/toy-source-$k/training_record.json" "$LOGS/toy-source-$k-record.json" 2>/dev/null
done
# Each new source against the shipped one and against source 0, per category and paired on the
# same prompts (l2p compare reads the scores train-source wrote into each training record).
for k in "${!TOY_PIDS[@]}"; do
  [ -f "/tmp/toy-source-$k/training_record.json" ] || continue
  against=(toy); [ "$k" -gt 0 ] && against+=("/tmp/toy-source-0")
  for b in "${against[@]}"; do
    for split in heldout train; do
      log "compare: toy source $k - $b ($split)"
      PYTHONPATH="/tmp/toy-pkg:${PYTHONPATH:-}" python3 -c "import argparse, sys
from l2p.cli import compare
parser = argparse.ArgumentParser(prog='l2p'); compare.register(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:]); sys.exit(args.func(args))" \
        compare "/tmp/toy-source-$k" "$b" --split "$split" 2>&1 | tee -a "$OUT/run.log"
    done
  done
done
if [ ${#REPRODUCE_PIDS[@]} -gt 0 ]; then
  # Held to the deadline (less what packing and the benchmarks after it need): a run still going
  # then is stopped, and what it wrote so far (resumable: rerun with the same --out) comes back.
  log "waiting for the toy reproductions"
  any_running() { local pid; for pid in "${REPRODUCE_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }
  while [ "$(left)" -gt "${REPRODUCE_RESERVE_S:-90}" ] && any_running; do sleep 5; done
  for k in "${!REPRODUCE_PIDS[@]}"; do
    if kill -0 "${REPRODUCE_PIDS[$k]}" 2>/dev/null; then
      log "toy reproduce $k: stopped at the deadline"; pkill -P "${REPRODUCE_PIDS[$k]}"
    fi
    wait "${REPRODUCE_PIDS[$k]}"
    grep -E "^\[|training seed|report|exit|Error" "$LOGS/reproduce-$k.log" | tail -12 | tee -a "$OUT/run.log"
  done
  ( cd /tmp && find reproduce-[0-9]* \( -name "*.json" -o -name "*.jsonl" -o -name "*.md" -o -name "*.png" \
      -o -name "*.yaml" \) -not -path "*/corpus-*" -print0 | tar --null -czf "$OUT/reproduce.tgz" -T - )
  last=$(( ${#REPRODUCE_PIDS[@]} - 1 ))
  model=$(ls -d /tmp/reproduce-$last/arms/l2p-align/seed-*/final/pipeline 2>/dev/null | head -1)
  [ -n "$model" ] && tar -C "$(dirname "$model")" -czf "$OUT/reproduce-model.tgz" pipeline
fi
# The weights come back for the runs TOY_KEEP names (default all; the device tool brings back
# 64 MB at most); every run's training record is in logs.tgz.
keep=(); for k in ${TOY_KEEP:-${!TOY_PIDS[@]}}; do
  [ -f "/tmp/toy-source-$k/model_index.json" ] && keep+=("toy-source-$k"); done
if [ ${#keep[@]} -gt 0 ]; then
  tar -C /tmp -czf /tmp/toy-sources.tgz "${keep[@]}" && split -b 15M /tmp/toy-sources.tgz "$OUT/toy-sources.tgz.part-"
fi
pack_logs

if [ "${BENCH:-1}" = 1 ] && python3 -c "import l2p._C" 2>/dev/null; then
  log "CUDA op benchmarks"
  within 150 0 python3 bench/cuda_report.py --quick > "$OUT/cuda_report.md" 2>&1
  log "bench exit $?"; cat "$OUT/cuda_report.md"
  log "unpatchify, interleaved: fused GEMM / cuBLAS + fold / Linear + permute / GEMM alone"
  within 60 0 python3 bench/gpu/unpatchify_ab.py > "$OUT/unpatchify_ab.md" 2>&1
  log "unpatchify A/B exit $?"; cat "$OUT/unpatchify_ab.md"
fi
if [ "${CHUNKS:-0}" = 1 ] && python3 -c "import l2p._C" 2>/dev/null; then
  log "patch ops at several chunk sizes, interleaved"
  within 120 0 python3 bench/gpu/patch_chunks_ab.py > "$OUT/patch_chunks_ab.md" 2>&1
  log "chunk A/B exit $?"; cat "$OUT/patch_chunks_ab.md"
fi
if [ "${HOST:-0}" = 1 ] && python3 -c "import l2p._C" 2>/dev/null; then
  log "host time per call at tiny shapes, l2p against torch (cases matching ${HOST_FILTER:-cuda})"
  within 150 0 python3 -m pytest bench/test_bench_host_overhead.py -k "${HOST_FILTER:-cuda}" --benchmark-enable -q -p no:cacheprovider \
    --benchmark-json "$LOGS/host_overhead.json" > "$LOGS/host_overhead.log" 2>&1
  log "host overhead exit $?"
  python3 bench/report.py "$LOGS/host_overhead.json" > "$OUT/host_overhead.md" 2>&1 && cat "$OUT/host_overhead.md"
fi
if [ "${PROFILE:-0}" = 1 ] && python3 -c "import l2p._C" 2>/dev/null; then
  # Per-kernel counters of one unpatchify call per way (Nsight Compute reads them on the lent
  # machines; --clock-control none leaves the clocks as the timings above saw them).
  log "unpatchify kernels under ncu: duration, SM throughput, instructions, warp stall reasons"
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  within 120 0 "$NCU" --profile-from-start off --clock-control none --metrics \
    gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_gmma_per_issue_active.ratio,smsp__average_warps_issue_stalled_sleeping_per_issue_active.ratio \
    python3 bench/gpu/profile_unpatchify.py > "$OUT/unpatchify_ncu.txt" 2>&1
  log "ncu exit $?"
  grep -E "^  [a-zA-Z]|duration|throughput|inst_executed|stalled" "$OUT/unpatchify_ncu.txt" | cut -c1-120
fi
if [ "${SAMPLING:-1}" = 1 ]; then
  log "sampling benchmark (pixel vs latent path, 1K-16K), the sizes of the issue's goals first"
  ids=()
  for c in 4096-pixel-untiled 4096-pixel-tiled 4096-latent-untiled 4096-latent-tiled \
           8192-pixel-untiled 8192-pixel-tiled 8192-latent-tiled 16384-pixel-tiled \
           1024-pixel-untiled 1024-latent-tiled 2048-pixel-untiled 2048-latent-tiled; do
    ids+=("bench/test_bench_sampling.py::test_step_and_final_image[$c]")
  done
  within 300 5 python3 -m pytest "${ids[@]}" --benchmark-enable -s -q -p no:cacheprovider \
    --benchmark-json "$LOGS/sampling.json" > "$LOGS/sampling.log" 2>&1
  log "sampling exit $? :: $(tail -1 "$LOGS/sampling.log")"
  grep -E "\^2 (pixel|latent)" "$LOGS/sampling.log" | tee -a "$OUT/run.log"
fi
if [ "${OFFLOAD:-1}" = 1 ]; then
  log "block offload against the resident transformer (one pixel FLUX-width call, 1024^2, bf16)"
  within 90 5 python3 -m pytest bench/test_bench_offload.py --benchmark-enable -s -q -p no:cacheprovider \
    --benchmark-json "$LOGS/offload.json" > "$LOGS/offload.log" 2>&1
  log "offload exit $? :: $(tail -1 "$LOGS/offload.log")"
  grep -E "^(resident|blocks):" "$LOGS/offload.log" | tee -a "$OUT/run.log"
fi
pack_logs
if [ "${PEAK:-1}" = 1 ]; then
  log "trainer peak memory"
  within 200 5 python3 tests/train/peak_memory.py --out "$LOGS/peak_memory.json" > "$LOGS/peak_memory.log" 2>&1
  log "peak memory exit $?"; grep -E '"peak_gib"|rror' "$LOGS/peak_memory.log" | tail -8 | tee -a "$OUT/run.log"
fi
pack_logs
log "done"
