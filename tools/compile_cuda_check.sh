#!/usr/bin/env bash
# CI compile check: build maskfrozen._C WITH its CUDA kernels (nvcc, sm_90 only) into a
# scratch directory, so the CUDA code keeps compiling on machines without a GPU. The
# working tree is left untouched. Then load the built module and check that it reports
# CUDA support (catches undefined symbols too). Exits non-zero on any failure.
#
#   tools/compile_cuda_check.sh            (PYTHON=... or VENV=... picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-${VENV:-.venv}/bin/python}
[ -x "$PY" ] || PY=python3

# torch guesses CUDA_HOME from where nvcc is found (/usr/local for a /usr/local/bin/nvcc
# wrapper), which misses lib64/libcudart: pick a toolkit root that has both.
has_toolkit() { [ -x "$1/bin/nvcc" ] && ls "$1"/lib64/libcudart.so* "$1"/lib/libcudart.so* >/dev/null 2>&1; }
candidates=("${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda)
command -v nvcc >/dev/null 2>&1 && candidates+=("$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")")
CUDA_HOME=
for c in "${candidates[@]}"; do
  if [ -n "$c" ] && has_toolkit "$c"; then CUDA_HOME=$c; break; fi
done
if [ -z "$CUDA_HOME" ]; then
  echo "compile_cuda_check: no CUDA toolkit (bin/nvcc + libcudart) found; set CUDA_HOME" >&2
  exit 1
fi
export CUDA_HOME

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
start=$(date +%s)
echo "compile_cuda_check: building maskfrozen._C with CUDA into $scratch"
if ! FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2} \
  "$PY" setup.py -q build_ext --build-temp "$scratch/tmp" --build-lib "$scratch/lib" >"$scratch/build.log" 2>&1; then
  grep -m 30 -E "error|FAILED" "$scratch/build.log" >&2 || tail -n 60 "$scratch/build.log" >&2
  echo "compile_cuda_check: FAILED to build the CUDA extension" >&2
  exit 1
fi

so=$(find "$scratch/lib" -name '_C*.so' | head -n 1)
if [ -z "$so" ]; then
  echo "compile_cuda_check: FAILED: the build produced no maskfrozen/_C*.so" >&2
  exit 1
fi
"$PY" - "$so" <<'EOF'
import importlib.util
import sys

import torch  # noqa: F401  (loads the libraries the extension links against)

spec = importlib.util.spec_from_file_location("maskfrozen._C", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
if not module.cuda_compiled():
    sys.exit("compile_cuda_check: FAILED: the built module reports no CUDA kernels")
EOF
echo "compile_cuda_check: OK ($(basename "$so"), $(( $(date +%s) - start )) s)"
