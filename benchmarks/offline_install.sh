#!/usr/bin/env bash
# Install this checkout on a GPU machine without network access, from wheels placed in .whl/
# (built beforehand elsewhere: `pip download --no-deps --python-version 3.12 -d .whl diffusers==0.42.1
# importlib_metadata==8.9.0 torchmetrics lightning-utilities` and `pip wheel --no-deps -w .whl .` for this
# package).
# Usage, from the repo root:  source benchmarks/offline_install.sh
# Then run python from OUTSIDE the repo root (e.g. `cd /tmp`), so that ./scaling_compile does not hide the
# installed package (whose scaling_compile.kernels / .passes come from kernels/ and passes/).
pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2>&1 | grep -v "Running pip as"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export REPO=$(pwd)
(cd /tmp && python -c "import scaling_compile.kernels, scaling_compile.passes, importlib.metadata as m; \
assert any(e.name == 'scaling' for e in m.entry_points(group='torch_dynamo_backends')); print('scaling_compile installed')")
