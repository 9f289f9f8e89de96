#!/usr/bin/env bash
# Every GPU figure the docs cite for issues 14, 16, 17 and 19, one stage after another on one CUDA GPU
# (each stage has its own time limit; the default list allows about 70 minutes; pick stages to run less). Each stage is one committed command, writes its JSON
# and its log into OUT, and is cut at its own time limit; a stage that fails does not stop the next.
# Usage, from the repo root with this package, diffusers and (optionally) flash-attn-4 and torchao
# installed:
#   OUT=out/gpu bash benchmarks/gpu_suite.sh                      # every stage, in this order
#   OUT=out/gpu bash benchmarks/gpu_suite.sh families kernel      # some of them
# Stages: tests (the GPU tests: kernels in bf16, CUDA graphs keeping the plan handles, HunyuanVideo 1.5's
# padded query rows against CUDA SDPA), tests_fa4 (the FA4 back-end and the online policies on the GPU), host (the op's host time per call on CUDA, op_host_time.py), families (bench_families: HunyuanVideo 720p/129f, CogVideoX-5B), kernel (the kernel table at
# (1,12,32760,128), (1,12,75600,128), (1,40,75600,128), random and 3D-local masks, with FA4 where
# installed), model (the 720p Wan2.1-1.3B forward: Gluon vs FA4 vs Inductor dense), quantized (the
# float8 Wan2.1-14B config at 720p, torchao), loop (the 50-step 720p loop, dense warm-up chosen by
# FAST's per-step sensitivity), quality480, quality720 (the harness at 480p / 720p, 81 frames, profiled at the serving
# grid, final-latent figures), profile13b (Wan2.1-1.3B at 480p / 81 frames under torch.profiler: the time
# of each stage of the profiling pass and its top kernels), profile14b (the profiling cost of Wan2.1-14B at 720p), profile14b_stages (one sample of each
# pass of it: the device time of each stage of the statistics; not in the default list), profile_kernels (the
# profiler's statistics kernels on one 14B chunk against PyTorch; not in the default list), ncu (Nsight Compute,
# Gluon vs FA4, on the kernel cells where Gluon ran below 0.95x FA4; not in the default list).
set -u
OUT=${OUT:-out/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
REPO=$(pwd)
WORKERS=${TEST_WORKERS:+-n $TEST_WORKERS}  # TEST_WORKERS=6: the tests stages in 6 pytest-xdist processes (kernel compiles are CPU-bound)
STAGES=${*:-tests tests_fa4 host families kernel model quantized loop quality720 profile13b profile14b}

stage() {  # stage NAME SECONDS COMMAND...: run COMMAND from /tmp (the installed package), log to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$OUT/suite.log"
  local start=$SECONDS
  (cd /tmp && timeout "$limit" "$@") >"$OUT/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/suite.log"
}

for name in $STAGES; do
  case $name in
    tests) stage tests 600 python3 -m pytest -q -p no:cacheprovider -rfE $WORKERS "$REPO/tests/test_gpu.py" \
        "$REPO/tests/test_padded_queries.py" "$REPO/tests/test_gluon_schedule.py" "$REPO/tests/test_mass_statistics_kernels.py" \
        "$REPO/tests/test_block_softmax.py" ;;  # from /tmp: the repo's scaling_compile/ folder is not the package
    profile_kernels) stage profile_kernels 180 python3 "$REPO/benchmarks/bench_profile_statistics.py" \
        --out "$OUT/profile_kernels.json" ;;
    tests_fa4) if ! (cd /tmp && python3 -c "import flash_attn.cute") >/dev/null 2>&1; then  # its GPU tests would all skip
        echo "== tests_fa4: flash-attn-4 does not import here: stage not run" | tee -a "$OUT/suite.log"; continue; fi
      stage tests_fa4 600 python3 -m pytest -q -p no:cacheprovider -rfE $WORKERS "$REPO/tests/test_fa4.py" \
        "$REPO/tests/test_policies_gpu.py" ;;
    host) stage host 120 python3 "$REPO/benchmarks/op_host_time.py" --device cuda --dtype bfloat16 --seq 1024 \
        --head-dim 128 --block 128 --heads 12 --profile ;;
    families) stage families 420 python3 "$REPO/benchmarks/bench_families.py" --out "$OUT/families.json" ;;
    kernel) stage kernel 600 python3 "$REPO/benchmarks/bench_kernel.py" \
        --shapes "1,12,32760,128;1,12,75600,128;1,40,75600,128" --masks random,local --variants gluon,lists_tma1 \
        --no-flex --rep 30 --rounds 3 --time-budget 540 --out "$OUT/kernel.json" ;;
    model) stage model 420 scaling-compile bench model --latent 21 90 160 --kernels gluon fa4 \
        --budgets 0.3 0.2 0.1 --iters 3 --out "$OUT/model720.json" ;;
    quantized) stage quantized 360 python3 "$REPO/benchmarks/bench_quantized.py" --quant float8 \
        --latent 21 90 160 --budgets 0.3 0.2 --kernel auto --out "$OUT/quantized_float8.json" ;;
    loop) stage loop 480 scaling-compile bench loop --latent 21 90 160 --steps 50 --budgets 0.2 \
        --dense-warmup auto 5 --kernel auto --out "$OUT/loop720.json" ;;
    quality480) stage quality480 900 python3 "$REPO/benchmarks/quality_harness.py" --config wan2.1-1.3b-480p \
        --no-speed --no-decode --out "$OUT/quality480" ;;  # profiled at the serving grid; WEST + FAST at the truth's density too
    quality720) stage quality720 1200 python3 "$REPO/benchmarks/quality_harness.py" --config wan2.1-1.3b-720p \
        --profile-latent 21 90 160 --no-speed --no-decode --out "$OUT/quality720" ;;
    profile13b) stage profile13b 300 python3 "$REPO/benchmarks/profile_wan13b.py" --no-small --kernel-table \
        --skip-instantiate --out "$OUT/profile13b/profile.json" ;;  # where the profiling time goes (torch.profiler)
    profile14b) stage profile14b 600 python3 "$REPO/benchmarks/profile_wan13b.py" --config wan2.1-14b \
        --latent 21 90 160 --no-small --sensitivity-samples 2 --skip-instantiate --out "$OUT/profile14b/profile.json" ;;
    profile14b_stages) stage profile14b_stages 420 python3 "$REPO/benchmarks/profile_wan13b.py" --config wan2.1-14b \
        --latent 21 90 160 --no-small --prompts 1 --timesteps 1 --sensitivity-samples 1 \
        --skip-instantiate --out "$OUT/profile14b_stages/profile.json" ;;  # one sample a pass: the stage clock's split
    ncu) i=0  # Nsight Compute on the kernel cells where Gluon missed 0.95x FA4 (2026-12-01 run)
      for cell in "1,12,32760,128 random 0.2" "1,12,32760,128 random 0.5" "1,12,75600,128 local 0.3"; do
        set -- $cell; i=$((i + 1))
        stage "ncu$i" 420 ncu --profile-from-start off --nvtx --section SpeedOfLight --section Occupancy \
          --section WarpStateStats --section LaunchStats --section ComputeWorkloadAnalysis \
          --section MemoryWorkloadAnalysis --section SchedulerStats \
          python3 "$REPO/benchmarks/ncu_kernel.py" --shape "$1" --mask "$2" --density "$3" --kernels gluon fa4
      done ;;
    *) echo "unknown stage $name" | tee -a "$OUT/suite.log" ;;
  esac
done
echo "== done ($(date -u +%T))" | tee -a "$OUT/suite.log"
