#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment: pinned torch/torchvision, the
# runtime dependencies, Detectron2 and maskfrozen in editable mode (with its compiled op).
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
PY=$ROOT/$VENV/bin/python
PIP=("$PY" -m pip --disable-pip-version-check -q)

deps_hash=$(cat "$CONSTRAINTS" requirements/base.txt "$D2_PATCH" | sha256sum | cut -c1-16)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$deps_hash" ]; then
  log "installing pinned dependencies (torch, torchvision, ...)"
  "${PIP[@]}" install -c "$CONSTRAINTS" --upgrade pip setuptools wheel
  "${PIP[@]}" install -c "$CONSTRAINTS" -r requirements/base.txt

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

# maskfrozen itself, editable; its extension is (re)built in place when a source changed.
if ! "$PY" -c "import maskfrozen" 2>/dev/null; then
  log "installing maskfrozen (editable)"
  "${PIP[@]}" install -c "$CONSTRAINTS" --no-build-isolation --no-deps -e .
fi
if [ "${MASKFROZEN_NO_EXT:-0}" != "1" ]; then
  newest_src=$(find maskfrozen/ops/csrc -type f -newer maskfrozen/_C.stamp 2>/dev/null | head -1 || true)
  if [ ! -f maskfrozen/_C.stamp ] || [ -n "$newest_src" ] || [ "$(find setup.py -newer maskfrozen/_C.stamp)" ]; then
    log "building maskfrozen._C (C++ CPU kernel; CUDA when a toolkit and FORCE_CUDA allow)"
    MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace
    touch maskfrozen/_C.stamp
  fi
fi
log "ready: $("$PY" -c 'import torch, detectron2, maskfrozen; print("torch", torch.__version__, "| detectron2", detectron2.__version__, "| maskfrozen", maskfrozen.__version__)')"
