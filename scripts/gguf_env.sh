#!/usr/bin/env bash
# The llama.cpp side virtualenv (.venv-gguf, or $DRAFTOPD_GGUF_VENV): llama.cpp's own HF -> GGUF converter and
# llama.cpp's server core, for `draftopd export --to gguf` and the llama.cpp serve check (tests/test_llamacpp.py).
# Optional: nothing else needs it. Idempotent: a second run does nothing. Only the package index is needed, and no
# compiler. What it holds, all pinned:
# - llama.cpp's converter (convert_hf_to_gguf.py, its conversion/ package and its own gguf-py, which has the
#   EAGLE-3 and DFlash constants PyPI's `gguf` lacks), taken from the llama-cpp-python 0.3.36 sdist (MIT; it vendors
#   ggml-org/llama.cpp@0c1e57098): downloaded with `pip download --no-binary`, only those files unpacked into
#   $VENV/llama.cpp, nothing built or installed from it;
# - what the converter imports, at its own pins where they matter: transformers 4.57.6 (the converter's pin; draftopd
#   needs >= 5.24, so it never shares a venv with this), sentencepiece, protobuf < 5, and torch 2.13.0 (the CPU
#   build on this disk, installed first and pinned so pip never pulls a CUDA build);
# - xllamacpp 2026.10.11549 (MIT; a prebuilt CPU wheel of llama.cpp's server core, b11549, with draft-eagle3 and
#   draft-dflash speculative decoding), driven by scripts/llamacpp_serve.py.
# The main .venv's `gguf` (the package transformers reads the default target with) is never touched.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=${DRAFTOPD_GGUF_VENV:-.venv-gguf}
LCP=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
XLC=${XLLAMACPP_VERSION:-2026.10.11549}
TORCH=2.13.0
TRANSFORMERS=4.57.6

if [ ! -x "$VENV/bin/python" ]; then
  echo "[gguf_env] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.draftopd-gguf-$LCP-$XLC"
if [ ! -f "$stamp" ]; then
  echo "[gguf_env] installing torch $TORCH (CPU), transformers $TRANSFORMERS, xllamacpp $XLC; unpacking llama.cpp's converter from llama-cpp-python $LCP"
  "$VENV/bin/pip" install -q "torch==$TORCH"
  "$VENV/bin/pip" install -q "torch==$TORCH" "transformers==$TRANSFORMERS" "sentencepiece>=0.1.98,<0.3" \
    "protobuf>=4.21,<5" "numpy>=2.2,<3" pyyaml requests tqdm safetensors "xllamacpp==$XLC"
  dl=$(mktemp -d)
  trap 'rm -rf "$dl"' EXIT
  "$VENV/bin/pip" download -q --no-deps --no-binary :all: -d "$dl" "llama-cpp-python==$LCP"
  rm -rf "$VENV/llama.cpp" "$VENV/llama.cpp.part"
  mkdir -p "$VENV/llama.cpp.part"
  top="llama_cpp_python-$LCP/vendor/llama.cpp"
  tar xzf "$dl/llama_cpp_python-$LCP.tar.gz" -C "$VENV/llama.cpp.part" --strip-components=3 \
    "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py" "$top/LICENSE"
  mv "$VENV/llama.cpp.part" "$VENV/llama.cpp"
  "$VENV/bin/python" -c "import torch, transformers, xllamacpp; assert '+cpu' in torch.__version__, torch.__version__" \
    || { echo "[gguf_env] imports failed in $VENV" >&2; exit 1; }
  "$VENV/bin/python" "$VENV/llama.cpp/convert_hf_to_gguf.py" --help >/dev/null \
    || { echo "[gguf_env] llama.cpp's converter does not start in $VENV" >&2; exit 1; }
  touch "$stamp"
fi
"$VENV/bin/python" -c "import torch, transformers, xllamacpp; print('[gguf_env] ready:', '$VENV', 'xllamacpp', xllamacpp.__version__, 'converter: llama-cpp-python $LCP', 'transformers', transformers.__version__, 'torch', torch.__version__)"
