#!/usr/bin/env bash
# One GPU session for the Gluon Hopper kernel (about 4-5 minutes on an H200; every stage is cut to fit
# DEADLINE seconds, default 540, so the whole run stays under a 10-minute command limit). From the repo root:
#   0. install (carried wheels in .whl/: diffusers etc.; FA4 too where /tmp/cu13stage was staged, see
#      ../shared/GPU.md), 1. a sanity check (plain, persistent, ping-pong, key padding + lse; small,
#      ragged): it decides which Gluon schedules the benchmark times, 2. the Gluon GPU tests of
#      tests/test_gpu.py and tests/test_gluon_schedule.py, in three shards beside the sanity check,
#      3. the kernel benchmark: (1,12,32760,128), (1,12,75600,128), (1,40,75600,128)
#      bf16, random and 3D-local masks (the package's own families), densities 1/0.5/0.3/0.2/0.1: cuDNN
#      dense, Triton, Gluon plain / persistent / ping-pong, FA4 where installed, FlexAttention at the first
#      shape; one markdown table per shape and mask kind, ratios from one process, 4. key padding (joint
#      video + text) with the Triton and the Gluon kernel.
# Usage:  OUT=out bash benchmarks/gpu_gluon_check.sh        (writes $OUT/*.json and $OUT/*.log)
# Knobs:  REP (do_bench ms, 20), TESTS (pytest -k), SHAPES, MASKS, DENSITIES, VARIANTS, FLEX_SHAPES ('' = no
#         Flex), SKIP_TESTS=1, SKIP_BENCH=1, DEADLINE (s), T_TEST / T_BENCH / T_KEYPAD (s per stage).
set -u
START=$SECONDS
DEADLINE=${DEADLINE:-540}
OUT=${OUT:-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: python runs from /tmp
REP=${REP:-20}
# seconds a stage may take: its own budget, cut to what is left before DEADLINE (0: skip it)
budget() { local want=$1 left=$((DEADLINE - (SECONDS - START))); [ "$left" -lt "$want" ] && want=$left; [ "$want" -lt 10 ] && want=0; echo "$want"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | grep -v "Running pip as" | tail -2
fi
if [ -d /tmp/cu13stage ]; then cp -a /tmp/cu13stage/. /tmp/site/ 2>/dev/null; fi  # FA4's CuTe DSL libs, staged earlier
PYTHONPATH=/tmp/site pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "Running pip as" | tail -3
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages PYTHONUNBUFFERED=1
REPO=$(pwd)  # python and pytest run from /tmp: from the repo root, ./scaling_compile would hide the editable mapping
if ! (cd /tmp && python -c "import scaling_compile.kernels" 2>/dev/null); then
  # the editable install did not take: a package of links maps scaling_compile(.kernels, .passes) to this checkout
  rm -rf /tmp/shim && mkdir -p /tmp/shim/scaling_compile
  for f in "$REPO"/scaling_compile/*; do ln -s "$f" /tmp/shim/scaling_compile/; done
  ln -s "$REPO/kernels" /tmp/shim/scaling_compile/kernels; ln -s "$REPO/passes" /tmp/shim/scaling_compile/passes
  export PYTHONPATH=/tmp/shim:$PYTHONPATH
fi
(cd /tmp && python -c "
import scaling_compile.kernels, triton, torch
from scaling_compile.kernels import fa4_block_sparse as fa4, gluon_block_sparse as g
print('import ok', scaling_compile.kernels.__file__, 'triton', triton.__version__, 'torch', torch.__version__)
print('gluon:', g.gluon_unsupported_reason(torch.device('cuda'), torch.bfloat16, 128, 128) or 'serves bf16 d128')
print('fa4 installed:', fa4.fa4_installed())")
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader

# Stages 1 and 2 run side by side (sanity + three test shards: Gluon compiles are single-threaded and
# dominate; the GPU has room for all four). The benchmark runs alone afterwards.
t=$(budget ${T_TEST:-150})
echo "== 1+2. sanity (plain, persistent, ping-pong, key padding + lse) and the Gluon GPU tests [$((SECONDS - START)) s, limit $t s]"
rm -f "$OUT/gluon_ok.txt" "$OUT"/tests_*.log
(cd /tmp && timeout -s KILL "$t" python "$REPO/benchmarks/gluon_sanity.py" --ok-file "$OUT/gluon_ok.txt" \
    > "$OUT/sanity.log" 2>&1; echo "sanity exit $?" >> "$OUT/sanity.log") &
if [ -z "${SKIP_TESTS:-}" ]; then
  if [ -n "${TESTS:-}" ]; then SHARDS=("$TESTS"); else SHARDS=(
    "gluon_kernel_matches_masked_sdpa"
    "gluon_kernel_key_padding_and_lse or gluon_kernel_lse_without_padding or gluon_pingpong or gluon_kernel_other_configs"
    "gluon_entry_route or gluon_persistent_uneven or gluon_kernel_stacked or auto_serves or views_tma or persistent_schedule_as_default or entry_bf16 or test_gluon_schedule"
  ); fi  # (the whole-model Gluon tests, test_backend_serves_wan_through_the_gluon_kernel, are left out: slow)
  for i in "${!SHARDS[@]}"; do
    (cd /tmp && timeout -s KILL "$t" python -m pytest -q --tb=short -p no:cacheprovider --maxfail=3 \
        "$REPO/tests/test_gpu.py" "$REPO/tests/test_gluon_schedule.py" -k "${SHARDS[$i]}" > "$OUT/tests_$i.log" 2>&1) &
  done
fi
wait
cat "$OUT/sanity.log"
GLUON_OK=$(cat "$OUT/gluon_ok.txt" 2>/dev/null)
echo "Gluon schedules the sanity check passed: ${GLUON_OK:-none}"
for log in "$OUT"/tests_*.log; do
  [ -f "$log" ] || continue
  echo "-- $(basename "$log" .log): $(grep -E 'passed|failed|skipped|error|no tests ran' "$log" | tail -1)"
  grep -qE "failed|error" "$log" && sed -n '/=* FAILURES\|=* ERRORS/,$p' "$log" | tail -30
done
echo "(sanity and tests took $((SECONDS - START)) s so far)"

if [ -z "${SKIP_BENCH:-}" ]; then
  # the Gluon schedules the sanity check passed (gluon, gluon_persistent, gluon_pingpong when all pass)
  VARIANTS=${VARIANTS:-lists_tma1${GLUON_OK:+,$GLUON_OK}}
  SHAPES=${SHAPES:-1,12,32760,128;1,12,75600,128;1,40,75600,128}
  FLEX_SHAPES=${FLEX_SHAPES-1,12,32760,128}
  echo "== 3. kernel benchmark: $VARIANTS; masks ${MASKS:-random,local}; rep $REP ms [$((SECONDS - START)) s]"
  IFS=';' read -ra SHAPE_LIST <<< "$SHAPES"
  for shape in "${SHAPE_LIST[@]}"; do
    flex=--no-flex
    [[ ";$FLEX_SHAPES;" == *";$shape;"* ]] && flex=
    want=${T_BENCH:-45}; [ -z "$flex" ] && want=$((want + 35))  # Flex compiles once per shape
    t=$(budget $((want + 30)))
    if [ "$t" -eq 0 ]; then echo "-- $shape: skipped, no time left before DEADLINE=$DEADLINE s"; continue; fi
    tag=${shape//,/x}
    # --time-budget: no new mask kind starts after it, so the run ends with its tables; the timeout is a backstop
    timeout -s KILL "$t" python benchmarks/bench_kernel.py --shapes "$shape" --masks "${MASKS:-random,local}" \
        --densities "${DENSITIES:-1.0,0.5,0.3,0.2,0.1}" --variants "$VARIANTS" $flex --rep "$REP" \
        --time-budget $((t > 30 ? t - 30 : t / 2)) --out "$OUT/bench_gluon_$tag.json" > "$OUT/bench_gluon_$tag.log" 2>&1
    echo "-- $shape (exit $?, $((SECONDS - START)) s so far; full log $OUT/bench_gluon_$tag.log)"
    # the tables (or, if the run was cut short, its per-kernel lines), and any failure
    if grep -q '^### ' "$OUT/bench_gluon_$tag.log"; then sed -n '/^### /,$p' "$OUT/bench_gluon_$tag.log"
    else grep -E "^S=|budget" "$OUT/bench_gluon_$tag.log" | cut -c1-170; fi
    grep -E "Error|failed" "$OUT/bench_gluon_$tag.log" | grep -v "^FAILED" | tail -5
  done
  t=$(budget ${T_KEYPAD:-45})
  echo "== 4. key padding: joint video + text (1,24,32760+256,128), last 156 text tokens padded [$((SECONDS - START)) s]"
  if [ "$t" -gt 0 ]; then
    timeout -s KILL "$t" python benchmarks/bench_kernel.py --key-padding --densities 0.3,0.1 --rep "$REP" \
        --variants "$VARIANTS" --out "$OUT/bench_key_padding.json" > "$OUT/bench_key_padding.log" 2>&1
    grep -E "^KEYPAD|\"error\"" "$OUT/bench_key_padding.log"
  else
    echo "skipped, no time left before DEADLINE=$DEADLINE s"
  fi
fi
echo "== done in $((SECONDS - START)) s"
