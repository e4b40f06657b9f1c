#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment: pinned torch/torchvision, the
# runtime dependencies, the export extra (onnx, onnxruntime, onnxscript), Detectron2 and
# maskfrozen in editable mode (with its compiled op), importable from any directory (checked
# from outside the repository).
# Idempotent: each step is skipped when its result is already in place.
#
#   VENV=.venv  PYTHON=python3  tools/setup_env.sh
#
# Detectron2: an importable official build is kept. Otherwise the PyPI sdist of its 0.6
# sources (pb1-detectron2, pinned by sha256) is downloaded, our compatibility patch
# third_party/detectron2/detectron2-0.6-compat.patch is applied, and the result is
# installed as the pure-Python package `detectron2`. Nothing is fetched from GitHub or a hub.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
CONSTRAINTS=$ROOT/requirements/constraints.txt
D2_SDIST_URL=https://files.pythonhosted.org/packages/60/26/48f5bbb7ee492696a21da23303daeecdfe3942c498a70d34108acf63b2bd/pb1-detectron2-0.6.tar.gz
D2_SDIST_SHA256=5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29
D2_PATCH=$ROOT/third_party/detectron2/detectron2-0.6-compat.patch
STAMP=$VENV/.maskfrozen-deps
log() { echo "[setup] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
case $VENV in /*) PY=$VENV/bin/python ;; *) PY=$ROOT/$VENV/bin/python ;; esac
PIP=("$PY" -m pip --disable-pip-version-check -q)

deps_hash=$(cat "$CONSTRAINTS" requirements/base.txt requirements/export.txt "$D2_PATCH" | sha256sum | cut -c1-16)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$deps_hash" ]; then
  log "installing pinned dependencies (torch, torchvision, ...)"
  "${PIP[@]}" install -c "$CONSTRAINTS" --upgrade pip setuptools wheel
  "${PIP[@]}" install -c "$CONSTRAINTS" -r requirements/base.txt
  log "installing the export extra (onnx, onnxruntime, onnxscript: tools/export_model.py and its tests)"
  "${PIP[@]}" install -c "$CONSTRAINTS" -r requirements/export.txt

  if "$PY" -c "import detectron2, detectron2._C" 2>/dev/null; then
    log "keeping the official detectron2 build already installed"
  elif "$PY" -c "import detectron2.utils.optional_c" 2>/dev/null \
      && [ "$(cat "$VENV/.detectron2-patch" 2>/dev/null)" = "$(sha256sum "$D2_PATCH" | cut -c1-16)" ]; then
    log "detectron2 (patched 0.6 sources) already installed"
  else
    log "installing detectron2 0.6 from its PyPI sdist with our compatibility patch"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    sdist=$work/pb1-detectron2-0.6.tar.gz
    "$PY" - "$D2_SDIST_URL" "$sdist" <<'PYEOF'
import sys, urllib.request
url, dest = sys.argv[1:3]
with urllib.request.urlopen(url, timeout=120) as r, open(dest, "wb") as f:
    f.write(r.read())
PYEOF
    echo "$D2_SDIST_SHA256  $sdist" | sha256sum -c --quiet -
    mkdir "$work/src"
    tar xzf "$sdist" -C "$work/src" --strip-components=1
    (cd "$work/src" && patch -p1 --quiet --forward < "$D2_PATCH")
    "${PIP[@]}" install -c "$CONSTRAINTS" --no-build-isolation "$work/src"
    sha256sum "$D2_PATCH" | cut -c1-16 > "$VENV/.detectron2-patch"
  fi
  echo "$deps_hash" > "$STAMP"
fi

# maskfrozen itself, editable. The check runs from outside the repository: from its root the
# current directory alone makes `import maskfrozen` work, installed or not. pip's editable build
# skips the extension (MASKFROZEN_NO_EXT=1); it is built once, in place, just below.
maskfrozen_installed() {  # pip metadata present and `import maskfrozen` resolves to this checkout
  (cd / && "$PY" -I - "$ROOT" 2>/dev/null <<'PYEOF'
import importlib.metadata, importlib.util, os, sys
importlib.metadata.distribution("maskfrozen")
spec = importlib.util.find_spec("maskfrozen")
want = os.path.realpath(os.path.join(sys.argv[1], "maskfrozen", "__init__.py"))
sys.exit(0 if spec is not None and os.path.realpath(spec.origin or "") == want else 1)
PYEOF
  )
}
if ! maskfrozen_installed; then
  log "installing maskfrozen (editable)"
  MASKFROZEN_NO_EXT=1 "${PIP[@]}" install -c "$CONSTRAINTS" --no-build-isolation --no-deps -e .
  if ! maskfrozen_installed; then
    echo "[setup] ERROR: after 'pip install -e .', $VENV/bin/python still does not import maskfrozen" \
      "from $ROOT when run outside the repository" >&2
    exit 1
  fi
fi
if [ "${MASKFROZEN_NO_EXT:-0}" != "1" ]; then
  newest_src=$(find maskfrozen/ops/csrc -type f -newer maskfrozen/_C.stamp 2>/dev/null | head -1 || true)
  if [ ! -f maskfrozen/_C.stamp ] || [ -n "$newest_src" ] || [ "$(find setup.py -newer maskfrozen/_C.stamp)" ] \
      || ! compgen -G "maskfrozen/_C*.so" >/dev/null; then
    log "building maskfrozen._C (C++ CPU kernel; CUDA when a toolkit and FORCE_CUDA allow)"
    MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace
    touch maskfrozen/_C.stamp
  fi
fi
# the final word is said from outside the repository, as a user's script would import it
if summary=$(cd / && "$PY" -c 'import torch, detectron2, maskfrozen; print("torch", torch.__version__, "| detectron2", detectron2.__version__, "| maskfrozen", maskfrozen.__version__, "from", maskfrozen.__path__[0])' 2>&1); then
  log "ready: ${summary##*$'\n'}"
else
  log "installed, but 'import maskfrozen' fails: ${summary##*$'\n'}"
fi
