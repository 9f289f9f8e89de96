#!/usr/bin/env bash
# One GPU session for the Gluon Hopper kernel (about 4 minutes on an H200), from the repo root:
#   1. install (carried wheels in .whl/: diffusers etc.; FA4 too where /tmp/cu13stage was staged, see
#      ../shared/GPU.md), 2. a sanity check (plain, persistent, key padding + lse; small, ragged),
#   3. the Gluon GPU tests of tests/test_gpu.py, 4. the kernel benchmark: (1,12,32760,128),
#   (1,12,75600,128), (1,40,75600,128) bf16, random and 3D-local masks (the package's own families),
#   densities 1/0.5/0.3/0.2/0.1: cuDNN dense, Triton, Gluon plain, persistent and ping-pong, FA4 where installed,
#   FlexAttention at the first shape; one markdown table per shape and mask kind, ratios in one process,
#   5. key padding (joint video + text) with the Triton and the Gluon kernel.
# Usage:  bash benchmarks/gpu_gluon_check.sh            (writes $OUT/*.json and $OUT/*.log)
# Knobs:  REP (do_bench ms, 20), TESTS (pytest -k), SHAPES, MASKS, DENSITIES, VARIANTS, FLEX_SHAPES ('' = no Flex),
#         SKIP_TESTS=1, SKIP_BENCH=1, T_TEST / T_BENCH / T_KEYPAD (seconds).
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
REP=${REP:-20}
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
START=$SECONDS

echo "== 1. sanity (plain, persistent, key padding + lse)"
rm -f "$OUT/gluon_ok.txt"
if ! (cd /tmp && timeout -s KILL 120 python "$REPO/benchmarks/gluon_sanity.py" --ok-file "$OUT/gluon_ok.txt"); then
  echo "SANITY FAILED (or timed out); Gluon schedules that passed: $(cat "$OUT/gluon_ok.txt" 2>/dev/null)"
fi
GLUON_OK=$(cat "$OUT/gluon_ok.txt" 2>/dev/null)

if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== 2. GPU tests: -k '${TESTS:-gluon or entry_bf16 or auto_serves}' (not the whole-model ones)"
  (cd /tmp && timeout -s KILL ${T_TEST:-120} python -m pytest -q --tb=short -p no:cacheprovider --maxfail=3 \
      "$REPO/tests/test_gpu.py" -k "${TESTS:-(gluon or entry_bf16 or auto_serves) and not backend_serves}" \
      2>&1 | tail -25)
  echo "(tests took $((SECONDS - START)) s so far)"
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  # the Gluon schedules the sanity check passed (all of gluon, gluon_persistent, gluon_pingpong when it passes)
  VARIANTS=${VARIANTS:-lists_tma1${GLUON_OK:+,$GLUON_OK}}
  SHAPES=${SHAPES:-1,12,32760,128;1,12,75600,128;1,40,75600,128}
  FLEX_SHAPES=${FLEX_SHAPES-1,12,32760,128}
  echo "== 3. kernel benchmark ($SHAPES; masks ${MASKS:-random,local}; rep $REP ms)"
  IFS=';' read -ra SHAPE_LIST <<< "$SHAPES"
  for shape in "${SHAPE_LIST[@]}"; do
    flex=--no-flex
    [[ ";$FLEX_SHAPES;" == *";$shape;"* ]] && flex=
    tag=${shape//,/x}
    budget=${T_BENCH:-50}; [ -z "$flex" ] && budget=$((budget + 40))  # Flex compiles once per shape
    # --time-budget: no new mask kind starts after it, so the run ends with its tables; the timeout is a backstop
    timeout -s KILL $((budget + 40)) python benchmarks/bench_kernel.py --shapes "$shape" --masks "${MASKS:-random,local}" \
        --densities "${DENSITIES:-1.0,0.5,0.3,0.2,0.1}" --variants "$VARIANTS" $flex --rep "$REP" \
        --time-budget "$budget" --out "$OUT/bench_gluon_$tag.json" > "$OUT/bench_gluon_$tag.log" 2>&1
    echo "-- $shape (exit $?, $((SECONDS - START)) s so far; full log $OUT/bench_gluon_$tag.log)"
    # the tables (or, if the run was cut short, its per-kernel lines), and any failure
    if grep -q '^### ' "$OUT/bench_gluon_$tag.log"; then sed -n '/^### /,$p' "$OUT/bench_gluon_$tag.log"
    else grep -E "^S=|budget" "$OUT/bench_gluon_$tag.log" | cut -c1-160; fi
    grep -E "Error|FAILED|failed" "$OUT/bench_gluon_$tag.log" | grep -v "^FAILED" | tail -5
  done
  echo "== 4. key padding: joint video + text (1,24,32760+256,128), last 156 text tokens padded, Triton and Gluon"
  timeout -s KILL ${T_KEYPAD:-45} python benchmarks/bench_kernel.py --key-padding --densities 0.3,0.1 --rep "$REP" \
      --out "$OUT/bench_key_padding.json" > "$OUT/bench_key_padding.log" 2>&1
  grep -E "^KEYPAD|\"error\"" "$OUT/bench_key_padding.log"
  grep -o '"kernel": "[a-z_]*", "density": [0-9.]*, "actual_density": [0-9.]*, "ms": [0-9.]*, "tflops": [0-9.]*, "err_vs_ref": [0-9.e-]*' \
      "$OUT/bench_key_padding.log"
fi
echo "== done in $((SECONDS - START)) s"
