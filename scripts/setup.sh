#!/usr/bin/env bash
# Create ./.venv with zipvoice installed in editable mode (plus test tools).
#
# torch is installed first, on its own, so that the project's open `torch>=2.3` requirement keeps
# whatever torch the machine should use:
#   - if pip's find-links (PIP_FIND_LINKS) holds a torch wheel (e.g. a CPU build provided by the
#     machine), that wheel is installed offline and kept;
#   - otherwise pip installs torch from the index as usual (the CUDA build on a Linux GPU box).
# Set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.6.0") to pin a version. Re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  spec=${TORCH_SPEC:-torch}
  # Offline from a local wheel folder when there is one (its dependencies come with the project
  # install below); this fails harmlessly where there is none.
  if ! pip_install --no-index --no-deps "$spec" 2>/dev/null; then
    pip_install "$spec"
  fi
fi
pip_install -e ".[dev]"
"$VENV/bin/python" -c "import torch, zipvoice; print('zipvoice ready: torch', torch.__version__)"
