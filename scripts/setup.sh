#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU build of torch and flt_mol
# installed in editable mode. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.flt_mol_installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/pip install --quiet "torch==${FLT_MOL_TORCH:-2.13.0}"
  .venv/bin/pip install --quiet -e ".[dev]"
  touch "$stamp"
fi
