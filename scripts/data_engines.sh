#!/usr/bin/env bash
# `draftopd data` tokens/s with each engine (hf: .venv, vllm: .venv-vllm from scripts/vllm_env.sh) on the same
# prompts, at batch 1 and batched, same threads and dtype, back to back in one run; prints a markdown table.
# The rate is generation only (new tokens / seconds inside the shard loop, the "engine ..: tok/s" log line):
# model loading and vLLM's start are not counted. Usage:
#   bash scripts/data_engines.sh [OUT=runs/data-engines] [PROMPTS=16] [NEW=64] [BATCH=16] [THREADS=1] [DTYPE=fp32]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/data-engines}
PROMPTS=${2:-16}
NEW=${3:-64}
BATCH=${4:-16}
THREADS=${5:-1}
DTYPE=${6:-fp32}
export OMP_NUM_THREADS=$THREADS TOKENIZERS_PARALLELISM=false
[ -x .venv-vllm/bin/draftopd ] || { echo "no .venv-vllm: run bash scripts/vllm_env.sh first" >&2; exit 2; }
rm -rf "$OUT"
mkdir -p "$OUT"
echo "| engine | batch | new tokens | seconds | tok/s |"
echo "|---|---:|---:|---:|---:|"
for batch in 1 "$BATCH"; do
  for engine in hf vllm; do
    venv=.venv
    [ "$engine" = vllm ] && venv=.venv-vllm
    log="$OUT/$engine-b$batch.log"
    "$venv/bin/draftopd" data --engine "$engine" --dtype "$DTYPE" --threads "$THREADS" --max-new-tokens "$NEW" \
      --out "$OUT/$engine-b$batch" --set "sources=[gsm8k]" --set "limit_per_source=$PROMPTS" \
      --set "batch_size=$batch" --set "chunk_size=$PROMPTS" >"$log" 2>&1
    line=$(grep -o "engine $engine: [0-9]* new tokens in [0-9.]* s ([0-9.]* tok/s)" "$log" | tail -1)
    read -r tokens secs rate < <(echo "$line" | sed -E 's/.*: ([0-9]+) new tokens in ([0-9.]+) s \(([0-9.]+) tok\/s\)/\1 \2 \3/')
    echo "| $engine | $batch | $tokens | $secs | $rate |"
  done
done
.venv/bin/python - "$OUT" <<'EOF'
import sys
from pathlib import Path

from draftopd.data.trajectories import load_shards

out = Path(sys.argv[1])
runs = sorted(p for p in out.iterdir() if p.is_dir())
ref = [r["response"] for r in load_shards(runs[0])]
same = {p.name: [r["response"] for r in load_shards(p)] == ref for p in runs}
print(f"\nresponses equal to {runs[0].name}'s: {same}")
EOF
echo "cpu flags: $(grep -o -w 'avx2\|avx512f\|avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "$(getconf _NPROCESSORS_ONLN) cores; threads $THREADS; dtype $DTYPE; $PROMPTS GSM8K-train prompts x $NEW new tokens"
