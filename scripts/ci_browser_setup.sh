#!/usr/bin/env bash
# Install what the browser test (tests/test_webdemo.py, marker `browser`) needs on a fresh Debian
# machine, and nothing that is already there:
#   * Debian's chromium at /usr/bin/chromium (Playwright drives it through executable_path; we never
#     run `playwright install`, which downloads a browser build and cannot work offline);
#   * gradio and playwright (the Python package, which carries its own Node driver) in the venv.
# Idempotent: a second run only checks. Usage: bash scripts/ci_browser_setup.sh [VENV]  (default .venv)
# Measured on a 2-core machine: ~1 min for apt (chromium), ~1.5-2 min for pip (first time); seconds after.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PY="$VENV/bin/python"
GRADIO_VERSION=6.31.0
PLAYWRIGHT_VERSION=1.65.2
t0=$(date +%s)

if [ ! -x /usr/bin/chromium ]; then
    echo "ci_browser_setup: installing Debian chromium"
    export DEBIAN_FRONTEND=noninteractive
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends chromium
else
    echo "ci_browser_setup: /usr/bin/chromium present ($(/usr/bin/chromium --version 2>/dev/null || echo '?'))"
fi

if [ ! -x "$PY" ]; then
    echo "ci_browser_setup: no venv at $VENV (run 'make setup' first)" >&2
    exit 1
fi

have() {  # have PACKAGE VERSION: exactly that version importable in the venv
    "$PY" - "$1" "$2" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    sys.exit(0 if version(sys.argv[1]) == sys.argv[2] else 1)
except PackageNotFoundError:
    sys.exit(1)
PYEOF
}
need=()
have gradio "$GRADIO_VERSION" || need+=("gradio==$GRADIO_VERSION")
have playwright "$PLAYWRIGHT_VERSION" || need+=("playwright==$PLAYWRIGHT_VERSION")
if [ ${#need[@]} -gt 0 ]; then
    echo "ci_browser_setup: pip install ${need[*]}"
    "$PY" -m pip install -q "${need[@]}"
else
    echo "ci_browser_setup: gradio $GRADIO_VERSION and playwright $PLAYWRIGHT_VERSION present"
fi
echo "ci_browser_setup: done in $(( $(date +%s) - t0 )) s"
