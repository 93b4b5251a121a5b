#!/usr/bin/env bash
# The GPU check of issue 17, on a fresh CUDA machine, in under 8 minutes: install, the `gpu` tests (compiled Triton
# kernels, SFT steps, eval and a served Recommend on CUDA), then benchmarks/device_check.py's table.
#
#   benchmarks/device_check.sh                 # installs into .venv-gpu with pip (needs a package index)
#   WHEELS=dir benchmarks/device_check.sh      # offline: pip installs from a folder of wheels
#   PYTHON=python3 NO_INSTALL=1 benchmarks/device_check.sh   # an environment that already has genrec's needs
#
# Exit status: non-zero when the GPU tests fail or a measurement cannot be taken; the table says which goals are met.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=${PYTHON:-.venv-gpu/bin/python}
if [[ -z "${NO_INSTALL:-}" ]]; then
    [[ -x .venv-gpu/bin/python ]] || python3 -m venv .venv-gpu
    if [[ -n "${WHEELS:-}" ]]; then
        .venv-gpu/bin/pip install -q --no-index --find-links "$WHEELS" -e ".[test]"
    else
        .venv-gpu/bin/pip install -q -e ".[test,gpu]"
    fi
fi
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "device_check: torch sees no CUDA device here"
print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
PY
echo "== gpu tests =="
"$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/server/test_server_gpu.py
echo "== measurements =="
"$PY" benchmarks/device_check.py "$@"
echo "device_check: done in $(( $(date +%s) - start )) s"
