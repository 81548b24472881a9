#!/usr/bin/env bash
# GPU checks of the Hopper wgmma attention kernels (csrc/attention/cuda/attention_fwd_wgmma.cu,
# attention_bwd_wgmma.cu), the default attention forward and backward on compute capability 9.0
# (L2P_ATTENTION_WGMMA=0 turns both off, L2P_ATTENTION_WGMMA_BACKWARD=0 the backward).
# Repo root, H100 or H200:
#   OUT=/some/dir bash bench/gpu/wgmma_check.sh
# 1. builds l2p for sm_90a only (the kernels' target; about half the time of the default build);
# 2. the wgmma tests alone (the profiler must see each kernel; they must match the float64
#    reference and the mma.sync kernels), then every CUDA attention test with them on;
# 3. compute-sanitizer memcheck, racecheck and synccheck on bench/gpu/wgmma_smoke.py;
# 4. the attention benchmarks with the switch off, then on (same machine, same run; the
#    forward+backward tables also carry a row with the mma.sync backward).
# Every step has a timeout; the log is $OUT/wgmma_check.log, the benchmarks
# $OUT/bench_wgmma0.md (switch off) and bench_wgmma1.md (on).
set -u
OUT=${OUT:-/tmp/l2p-wgmma-check}
mkdir -p "$OUT"
LOG=$OUT/wgmma_check.log
step() {  # step TIMEOUT_S COMMAND...: runs it into the log, prints and returns its exit status
  local limit=$1 rc; shift
  echo "== $* (at most ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1; rc=$?
  echo "== exit $rc" | tee -a "$LOG"
  return $rc
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$LOG"
# The distribution's g++ (as in device_run.sh: the image's default links libstdc++ statically).
[ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
step 300 env L2P_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 \
  python3 setup.py build_ext --inplace || exit 1
export PYTHONPATH=python L2P_ATTENTION_WGMMA=1
step 120 python3 -m pytest -x -q -p no:cacheprovider tests/ops/test_cuda_ops.py -k wgmma
step 240 python3 -m pytest -q -rfE -p no:cacheprovider -n 8 tests/ops/test_cuda_ops.py \
  tests/ops/test_attention.py tests/sample/test_attention_routing.py
for tool in memcheck racecheck synccheck; do
  step 180 compute-sanitizer --tool "$tool" --error-exitcode 99 python3 bench/gpu/wgmma_smoke.py
done
for switch in 0 1; do  # 0: the mma.sync kernels; 1: the wgmma ones
  echo "== attention benchmarks, L2P_ATTENTION_WGMMA=$switch" | tee -a "$LOG"
  L2P_ATTENTION_WGMMA=$switch timeout 150 python3 bench/cuda_report.py --quick \
    --only "attention" > "$OUT/bench_wgmma$switch.md" 2>&1
  echo "== exit $?" | tee -a "$LOG"
  tee -a "$LOG" < "$OUT/bench_wgmma$switch.md"
done
grep -E "^== |passed|failed|ERROR SUMMARY" "$LOG"
