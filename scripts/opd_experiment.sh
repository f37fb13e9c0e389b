#!/usr/bin/env bash
# The Draft-OPD experiment of docs/RESULTS.md: from one SFT drafter, four arms with the same number of drafter
# updates: Draft-OPD, OPD with random response anchors, OPD without the rejected stream, and SFT continued
# on the trajectories of the same prompts. Each arm is resumable; rerun the script after an interruption.
# Usage: scripts/opd_experiment.sh [SFT_DRAFTER] [OUT] [ITERATIONS]   (runs in the foreground; use nohup)
set -euo pipefail
cd "$(dirname "$0")/.."
SFT=${1:-runs/sft-dflash/final}
OUT=${2:-runs/opd-exp}
IT=${3:-30}
D=.venv/bin/draftopd
mkdir -p "$OUT/logs"
common=(--config configs/opd-dflash.yaml --set "init_from=$SFT" --set "iterations=$IT")
$D train opd "${common[@]}" --set "out=$OUT/opd" 2>&1 | tee "$OUT/logs/opd.log"
$D train opd "${common[@]}" --set "out=$OUT/opd-random-anchors" --set random_anchors=true 2>&1 | tee "$OUT/logs/random.log"
$D train opd "${common[@]}" --set "out=$OUT/opd-no-rejected" --set rej_weight=0 2>&1 | tee "$OUT/logs/norej.log"
# SFT continued on the same prompts: their target trajectories (the rollouts' text is exactly these,
# greedy verification being lossless), the same number of updates, batch sized to a similar target compute.
$D data --config configs/data.yaml --set sources=[gsm8k,sharegpt] --set limit_per_source=128 \
  --out "$OUT/opd-prompts" 2>&1 | tee "$OUT/logs/data.log"
$D train sft --config configs/sft-dflash.yaml --set "init_from=$SFT" --set "data=$OUT/opd-prompts" \
  --set "out=$OUT/sft-continued" --set "steps=$IT" --set batch_size=8 --set lr=1.0e-4 --set warmup_ratio=0.05 \
  --set eval_every=5 --set save_every=5 2>&1 | tee "$OUT/logs/sft-cont.log"
.venv/bin/python - "$OUT" <<'PY'
import sys
from draftopd.report import tau_curves
out = sys.argv[1]
runs = {"SFT continued": f"{out}/sft-continued", "Draft-OPD": f"{out}/opd",
        "OPD, random anchors": f"{out}/opd-random-anchors", "OPD, no rejected stream": f"{out}/opd-no-rejected"}
print(tau_curves(runs, f"{out}/tau_vs_compute.png", "tau on held-out GSM8K vs training compute"))
PY
