#!/usr/bin/env bash
# Generate, or resume, the committed trajectory pools of the default target (configs/pool.yaml), one data folder per
# prompt source, pool B first (2,000 held-out GSM8K-train questions), then pool A (MBPP, the other 5,473 GSM8K-train
# questions, ShareGPT first turns). Each `draftopd data` skips finished shards, so rerunning this script resumes
# where it stopped (a killed run loses at most the shard in progress). Commit the new shards, manifests and cards as
# they appear with scripts/pool_commit.sh. Run from any checkout; lowest priority, logged:
#   mkdir -p logs && nohup nice -n 19 setsid bash scripts/pool_generate.sh > logs/pool-gen.log 2>&1 &
# PY overrides the interpreter (default .venv/bin/python); extra arguments go to every `draftopd data`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
ROOT=pools/smollm2-135m-instruct
for spec in B/gsm8k_b:gsm8k_b A/mbpp:mbpp A/gsm8k_a:gsm8k_a A/sharegpt:sharegpt; do
  folder=${spec%%:*} source=${spec##*:}
  echo "[pool] $(date -u +%FT%TZ) $source -> $ROOT/$folder"
  "$PY" -m draftopd.cli data --config configs/pool.yaml --out "$ROOT/$folder" --set "sources=[$source]" "$@"
done
echo "[pool] $(date -u +%FT%TZ) all folders done"
