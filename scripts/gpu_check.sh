#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): engine == transformers' generate, SFT tokens/s and OPD seconds per update
# for DFlash and EAGLE-3 on a random-weight Qwen3-8B-shaped target in bf16, peak memory, and the SFT steps again
# under `torchrun --nproc-per-node 1` when torchrun is installed. No network, no downloads; < 10 min on one
# H100/H200. Writes one JSON file: $OUT/gpu_check.json when $OUT is set, else ./gpu_check.json.
# Usage: scripts/gpu_check.sh [gpu_check.py flags, e.g. --steps 2 or --tiny --device cpu]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out="${OUT:+$OUT/}gpu_check.json"
extra=()
if command -v torchrun >/dev/null 2>&1 || [ -x "$(dirname "$PY")/torchrun" ]; then
  extra+=(--torchrun)
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
exec "$PY" scripts/gpu_check.py --out "$out" ${extra[@]+"${extra[@]}"} "$@"
