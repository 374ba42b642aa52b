#!/usr/bin/env bash
# Creates one virtual environment per peer library under .venv-peers/ and installs the peer there.
# Each peer pins numpy/pandas/lightning differently from pinfm-hf, so they never share an environment.
# torch==2.13.0 goes in FIRST: on these machines it resolves to the local CPU wheel; an unpinned torch
# pulled in later by a peer's dependencies would fetch gigabytes of CUDA packages.
# Idempotent: a venv whose stamp file matches the requested package list is skipped.
#
# Usage: bash benchmarks/peers/setup_peers.sh [recbole] [rectools]   (default: both)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENVS="$ROOT/.venv-peers"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="torch==2.13.0"

# RecBole 1.2.1 uses np.float (numpy<2), pandas 2.3+ needs numpy 2, ray 2.6.3 imports pkg_resources.
RECBOLE_SPECS=("recbole==1.2.1" "numpy<2" "pandas<2.3" "setuptools<81")
# RecTools 0.19 caps pytorch-lightning at <=2.5.2 and numpy <2 (on Python < 3.13); pin lightning exactly
# so the resolver never drifts, and keep torch pinned so lightning cannot swap it.
RECTOOLS_SPECS=("rectools[torch]==0.19.0" "pytorch-lightning==2.5.2" "numpy<2" "$TORCH_SPEC")

# pip_quiet PIP ARGS... : pip install, minus this machine's warnings about absent local index folders.
pip_quiet() {
    local pip="$1"; shift
    "$pip" install --quiet "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

# install_peer NAME SPEC... : create .venv-peers/NAME with torch first, then SPEC..., then write a stamp.
install_peer() {
    local name="$1"; shift
    local venv="$VENVS/$name"
    local stamp="$venv/.peer-stamp"
    local want="$TORCH_SPEC $*"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        echo "[setup_peers] $name: already complete ($venv), skipping"
        return
    fi
    echo "[setup_peers] $name: creating $venv with $PYTHON"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    echo "[setup_peers] $name: pip install $TORCH_SPEC (first, CPU build)"
    pip_quiet "$venv/bin/pip" "$TORCH_SPEC"
    echo "[setup_peers] $name: pip install $*"
    pip_quiet "$venv/bin/pip" "$@"
    "$venv/bin/python" - <<'EOF'
import importlib.metadata as md
for p in ("torch", "numpy", "pandas", "recbole", "rectools", "pytorch-lightning"):
    try:
        print(f"[setup_peers]   {p}=={md.version(p)}")
    except md.PackageNotFoundError:
        pass
EOF
    echo "$want" > "$stamp"
    echo "[setup_peers] $name: done"
}

targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=(recbole rectools)
mkdir -p "$VENVS"
for t in "${targets[@]}"; do
    case "$t" in
        recbole) install_peer recbole "${RECBOLE_SPECS[@]}" ;;
        rectools) install_peer rectools "${RECTOOLS_SPECS[@]}" ;;
        *) echo "[setup_peers] unknown peer: $t (expected recbole or rectools)" >&2; exit 2 ;;
    esac
done
