#!/usr/bin/env bash
# Idempotent set-up: a .venv with draftopd installed, the embedded default target fetched and converted,
# and the evaluation data sets unpacked, all into a git-ignored cache ($DRAFTOPD_HOME, default
# ~/.cache/draftopd). Safe to rerun: every step is skipped when its output already exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
export DRAFTOPD_HOME=${DRAFTOPD_HOME:-$HOME/.cache/draftopd}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.draftopd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing torch (CPU build) and draftopd"
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
# Model and data sets: each step checks its own output and is skipped when done.
.venv/bin/draftopd setup
