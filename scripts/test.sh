#!/usr/bin/env bash
# Set-up, then the whole test suite (slow end-to-end checks on ../shared/data included), in 2 worker processes
# (pytest-xdist: much of the suite is process start-up and data loading, which overlap; idle workers take queued
# tests from the busy one). One torch thread per process: two workers already fill both cores, and each test's child
# processes would otherwise spin on threads the other worker needs. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest tests -n 2 --dist worksteal "$@"
