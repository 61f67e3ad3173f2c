#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU build of torch and flt_mol
# installed in editable mode. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH="torch==${FLT_MOL_TORCH:-2.13.0}"
stamp=.venv/.flt_mol_installed
if [ ! -x .venv/bin/python ]; then
  echo "== set-up: creating .venv, then installing $TORCH (CPU) and flt_mol into it (a few minutes, once)"
  "$PY" -m venv .venv
elif [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "== set-up: installing $TORCH (CPU) and flt_mol into .venv (a few minutes, once)"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/pip install --quiet "$TORCH"
  .venv/bin/pip install --quiet -e ".[dev]"
  touch "$stamp"
fi
