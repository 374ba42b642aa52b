#!/usr/bin/env bash
# Creates .venv (if missing) and installs pinfm-hf with its test extras. CPU torch is pinned first, so pip never
# pulls the multi-gigabyte CUDA build. Re-running is cheap: nothing is installed again until pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=.venv/.pinfm-installed
wanted=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$wanted" ] && .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('pinfm_hf') is None)" 2>/dev/null; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[test,scale,spark,retrieval,serve]"
echo "$wanted" > "$STAMP"
