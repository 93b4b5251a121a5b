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
    # The GPU twins replace faiss-cpu and onnxruntime (both pairs install the same import package), as the CUDA image
    # does; pip cannot swap a dependency, so: install, remove the CPU ones, add the GPU ones.
    src=(); [[ -n "${WHEELS:-}" ]] && src=(--no-index --find-links "$WHEELS")
    .venv-gpu/bin/pip install -q "${src[@]}" -e ".[test]"
    .venv-gpu/bin/pip uninstall -q -y faiss-cpu onnxruntime
    .venv-gpu/bin/pip install -q "${src[@]}" faiss-gpu-cu12 onnxruntime-gpu
fi
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "device_check: torch sees no CUDA device here"
print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
PY
echo "== gpu tests =="
GENREC_GPU_TESTS=1 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/server/test_server_gpu.py
echo "== measurements =="
"$PY" benchmarks/device_check.py "$@"
echo "device_check: done in $(( $(date +%s) - start )) s"
