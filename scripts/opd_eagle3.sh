#!/usr/bin/env bash
# Draft-OPD vs SFT continued (matched updates, same prompts) for an EAGLE-3 drafter; docs/RESULTS.md.
# Each step is resumable: rerun the script after an interruption.
# Usage: scripts/opd_eagle3.sh [SFT_DRAFTER] [TRAJECTORIES] [OUT] [PROMPTS]
set -euo pipefail
cd "$(dirname "$0")/.."
SFT=${1:-runs/sft-eagle3/final}
DATA=${2:-runs/demo/data}      # the target trajectories of the OPD prompts (configs/opd-eagle3.yaml)
OUT=${3:-runs/opd-eagle3}
N=${4:-16}
D=.venv/bin/draftopd
mkdir -p "$OUT/logs"
IT=$(.venv/bin/python -c "import yaml; print(yaml.safe_load(open('configs/opd-eagle3.yaml'))['max_steps'])")
$D train opd --config configs/opd-eagle3.yaml --set "init_from=$SFT" --set "out=$OUT/opd" 2>&1 | tee -a "$OUT/logs/opd.log"
$D train sft --config configs/sft-eagle3.yaml --set "init_from=$SFT" --set "data=$DATA" --set "out=$OUT/sft_continued" \
  --set "max_steps=$IT" --set batch_size=4 --set lr=3.0e-4 --set warmup_ratio=0 --set eval_every=2 --set save_every=1 \
  --set log_every=1 --set eval.max_new_tokens=96 --set max_len=512 2>&1 | tee -a "$OUT/logs/sft_continued.log"
$D bench --config configs/bench.yaml --set tau_only=true --set "limit=$N" --set "datasets=[gsm8k,humaneval]" \
  --set sampling.max_new_tokens=128 --set drafter.chain_length=6 \
  --set "methods=[SFT=$SFT,SFT continued=$OUT/sft_continued/final,Draft-OPD=$OUT/opd/final]" \
  --json "$OUT/tau.json" 2>&1 | tee -a "$OUT/logs/tau.log"
.venv/bin/python - "$OUT" <<'PY'
import sys
from pathlib import Path
from draftopd.report import tau_curves
out = Path(sys.argv[1])
runs = {"SFT continued (matched updates)": out / "sft_continued", "Draft-OPD": out / "opd"}
print(tau_curves(runs, out / "tau_vs_compute.png", "EAGLE-3: tau on held-out GSM8K vs target tokens"))
PY
