#!/usr/bin/env bash
# The LoRA/DoRA accent-vs-speaker study in one command (see docs/lora-study.md).
#
#   egs/lora_study/run.sh            # full study, under 90 min on 2 shared CPU cores
#   egs/lora_study/run.sh --quick    # smoke test of every stage, a few minutes
#
# Extra arguments go to study.py (--work-dir, --methods, --jobs, --force, --plot-out, --device,
# --stop-after).
# Needs the Debian TTS programs below; installs them with apt-get when run as root.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"

packages=(flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts espeak-ng)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "Installing ${missing[*]} ..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "error: missing Debian packages: ${missing[*]}" >&2
    echo "install them (as root): apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

if ! "$python" -c "import matplotlib, resemblyzer, pyopenjtalk" 2>/dev/null; then
  echo "error: the study needs the eval and study extras: scripts/setup.sh," \
    "then pip install -e '$repo[study]'" >&2
  exit 1
fi

cd "$repo"
exec nice -n 10 "$python" "$here/study.py" "$@"
