# Sourced by demo.sh and test.sh: create .venv on first use and install tristage into it.
# TRISTAGE_EXTRAS names the extras to add (test.sh: "dev", with Chromium for the browser test); the demo
# needs none, so its first run installs only the runtime dependencies.
# CPU-only machines get the CPU torch wheel (torch==2.13.0, or TRISTAGE_TORCH_INDEX for a wheel index);
# machines with an NVIDIA driver get the default (CUDA) torch build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TRISTAGE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
EXTRAS="${TRISTAGE_EXTRAS:-}"
STAMP="$VENV/.tristage-${EXTRAS:-base}-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      "$VENV/bin/pip" install -q torch
    elif [ -n "${TRISTAGE_TORCH_INDEX:-}" ]; then
      "$VENV/bin/pip" install -q torch==2.13.0 --index-url "$TRISTAGE_TORCH_INDEX"
    else
      "$VENV/bin/pip" install -q torch==2.13.0
    fi
  fi
  "$VENV/bin/pip" install -q -e "$ROOT${EXTRAS:+[$EXTRAS]}"
  touch "$STAMP"
fi
# The app's browser test drives Debian's headless Chromium through chromedriver (tests/test_app_browser.py).
if [ "$EXTRAS" = dev ] && ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null \
    || echo "env.sh: could not install chromium; the browser test will be skipped" >&2
fi
export PATH="$VENV/bin:$PATH"
export WANDB_MODE="${WANDB_MODE:-offline}"
export HF_HUB_OFFLINE=1
cd "$ROOT"
