#!/usr/bin/env bash
# One GPU session for the Gluon kernel: install, sanity check, timings (Gluon vs Triton vs cuDNN; key padding),
# then the GPU tests (tests/test_gpu.py -k "$TESTS", default the Gluon ones).
# Usage on the GPU machine, from the repo root (carry .whl):
#   VARIANTS=gluon,lists_tma1 TESTS="gluon or entry_bf16 or entry_key_valid_in_a_cuda_graph" \
#       bash benchmarks/gpu_gluon_check.sh 50        (writes $OUT/bench_gluon.json, $OUT/bench_key_padding.json)
# Knobs: VARIANTS, MASKS (random), TESTS, KEYPAD ('' skips), T_SANITY / T_BENCH / T_KEYPAD / T_TEST (seconds).
set -u
REP=${1:-50}
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
PYTHONPATH=/tmp/site pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "Running pip as" | tail -5
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
REPO=$(pwd)  # python and pytest run from /tmp: from the repo root, ./scaling_compile would hide the editable mapping
if ! (cd /tmp && python -c "import scaling_compile.kernels" 2>/dev/null); then
  # the editable install did not take: a package of links maps scaling_compile(.kernels, .passes) to this checkout
  rm -rf /tmp/shim && mkdir -p /tmp/shim/scaling_compile
  for f in "$REPO"/scaling_compile/*; do ln -s "$f" /tmp/shim/scaling_compile/; done
  ln -s "$REPO/kernels" /tmp/shim/scaling_compile/kernels; ln -s "$REPO/passes" /tmp/shim/scaling_compile/passes
  export PYTHONPATH=/tmp/shim:$PYTHONPATH
fi
(cd /tmp && python -c "import scaling_compile.kernels, triton, torch; print('import ok', scaling_compile.__file__, triton.__version__, torch.__version__)")
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader
echo "== sanity"
if ! (cd /tmp && timeout -s KILL ${T_SANITY:-60} python $REPO/benchmarks/gluon_sanity.py); then echo "SANITY FAILED"; SKIP_GLUON=1; fi
echo "== bench gluon vs triton vs cudnn"
[ -n "${SKIP_GLUON:-}" ] && VARIANTS=lists_tma1
timeout -s KILL ${T_BENCH:-120} python benchmarks/bench_kernel.py --shapes 1,12,32760,128 --masks ${MASKS:-random} \
    --variants ${VARIANTS:-gluon,lists_tma1} --no-flex --rep $REP --out $OUT/bench_gluon.json 2>&1 | grep -v "^  tuned" | tail -40
if [ -n "${KEYPAD:-1}" ]; then
  echo "== key padding"
  timeout -s KILL ${T_KEYPAD:-90} python benchmarks/bench_kernel.py --key-padding --densities 0.5,0.3,0.2,0.1 --rep $REP \
      --out $OUT/bench_key_padding.json 2>&1 | tail -12
fi
echo "== correctness"
[ -z "${SKIP_GLUON:-}" ] && (cd /tmp && timeout -s KILL ${T_TEST:-150} python -m pytest -q --maxfail=2 --tb=short -p no:cacheprovider \
    $REPO/tests/test_gpu.py -k "${TESTS:-gluon}" 2>&1 | tail -40)
