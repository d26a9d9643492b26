#!/usr/bin/env bash
# One-time (idempotent) set-up: a virtual environment in .venv with torch, DeepSpeed and this package.
#
# - Without an NVIDIA GPU it installs the CPU build of torch (TORCH_SPEC, default torch==2.13.0), and never
#   lets a later install pull a multi-GB CUDA build. Set TORCH_INDEX_URL to install torch from a specific index
#   (e.g. your mirror of PyTorch's CPU or CUDA wheels).
# - With a GPU (nvidia-smi works) it installs torch with pip's default resolution, which is a CUDA build.
# - A second run reuses what is there and only re-installs the package when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=${VENV:-.venv}
PIP="$VENV/bin/python -m pip"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  index_args=()
  if [ -n "${TORCH_INDEX_URL:-}" ]; then index_args=(--index-url "$TORCH_INDEX_URL"); fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] GPU found: installing torch (CUDA build)"
    $PIP install "${index_args[@]}" torch
  else
    echo "[setup] no GPU: installing the CPU build $TORCH_SPEC"
    $PIP install "${index_args[@]}" "$TORCH_SPEC"
  fi
fi

stamp="$VENV/.ltsft-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing ltsft-dist and its dependencies"
  # torch is already satisfied, so pip keeps the build chosen above.
  $PIP install -e ".[test]"
  touch "$stamp"
fi

if ! command -v nvidia-smi >/dev/null 2>&1; then
  "$VENV/bin/python" - <<'PY'
import torch
if torch.version.cuda:
    print(f"[setup] warning: torch {torch.__version__} is a CUDA build on a machine without a GPU")
PY
fi
echo "[setup] ready: $VENV/bin/ltsft ($("$VENV/bin/ltsft" --version))"
