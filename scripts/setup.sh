#!/usr/bin/env bash
# Create ./.venv with zipvoice installed in editable mode (plus test tools and the evaluation
# extra, whose metric models the tests run).
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
pip_install -e ".[dev,eval]"
# The offline speaker encoder of zipvoice.eval, without its `webrtcvad` (source-only, needs a
# compiler) and `typing` requirements: the eval extra brings webrtcvad-wheels and librosa.
pip_install --no-deps "resemblyzer==0.1.4"
# Speech engines the evaluation and study tests synthesise voices with (Debian/Ubuntu packages,
# about 10 MB). Installed when missing and apt-get can run; otherwise those tests skip and say why.
engines=(flite espeak-ng festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts)
missing=()
for pkg in "${engines[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  apt=""
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    apt="apt-get"
  elif command -v sudo > /dev/null && sudo -n true 2> /dev/null; then
    apt="sudo -n apt-get"
  fi
  if [ -n "$apt" ]; then
    # A fresh machine may have empty package lists: update once if the first try fails.
    $apt install -y -q "${missing[@]}" > /dev/null 2>&1 \
      || { $apt update -q > /dev/null 2>&1 && $apt install -y -q "${missing[@]}" > /dev/null; } \
      || echo "setup: could not install ${missing[*]}; some eval/study tests will skip"
  else
    echo "setup: ${missing[*]} missing (apt-get install ${missing[*]}); some eval/study tests will skip"
  fi
fi
"$VENV/bin/python" -c "import torch, zipvoice; print('zipvoice ready: torch', torch.__version__)"
