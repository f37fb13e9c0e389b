#!/usr/bin/env bash
# The Draft-OPD experiment of docs/RESULTS.md, on top of a finished `make demo` run (which already holds the
# SFT drafter, Draft-OPD and SFT continued with matched updates): adds the two ablations with the demo's own
# OPD config (random response anchors; no rejected stream) and two loss variants (first rejected proposal only;
# full-vocabulary KL), draws the six tau-vs-compute curves, and measures
# the final tau of every arm on held-out GSM8K test_dev and HumanEval prompts (batched, untimed).
# The figures of docs/RESULTS.md 3-4 came from a run of fcda128's configs/demo.yaml, whose OPD arm uses the paper
# loss; since ca8fdc7 the demo's OPD arm already keeps only the first rejected proposal (so does every arm here).
# Each step is resumable: rerun the script after an interruption.
# Usage: scripts/opd_experiment.sh [DEMO_OUT] [PROMPTS]     (e.g. nohup scripts/opd_experiment.sh &)
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${1:-runs/demo}
N=${2:-32}
D=.venv/bin/draftopd
mkdir -p "$DEMO/ablations" "$DEMO/logs"
$D train opd --config "$DEMO/configs/opd.yaml" --set "out=$DEMO/ablations/random_anchors" \
  --set random_anchors=true 2>&1 | tee -a "$DEMO/logs/ablation_random_anchors.log"
$D train opd --config "$DEMO/configs/opd.yaml" --set "out=$DEMO/ablations/no_rejected" \
  --set rej_weight=0 2>&1 | tee -a "$DEMO/logs/ablation_no_rejected.log"
$D train opd --config "$DEMO/configs/opd.yaml" --set "out=$DEMO/variants/opd_rej_first" \
  --set rej_first_only=true 2>&1 | tee -a "$DEMO/logs/variant_rej_first.log"
$D train opd --config "$DEMO/configs/opd.yaml" --set "out=$DEMO/variants/opd_full_kl" \
  --set loss=full_kl 2>&1 | tee -a "$DEMO/logs/variant_full_kl.log"
$D bench --config "$DEMO/configs/bench.yaml" --set tau_only=true --set "limit=$N" \
  --set "datasets=[gsm8k,humaneval]" --set sampling.max_new_tokens=128 \
  --set "methods=[SFT=$DEMO/sft/final,SFT continued=$DEMO/sft_continued/final,Draft-OPD=$DEMO/opd/final,OPD random anchors=$DEMO/ablations/random_anchors/final,OPD no rejected stream=$DEMO/ablations/no_rejected/final,OPD first rejected only=$DEMO/variants/opd_rej_first/final,OPD full KL=$DEMO/variants/opd_full_kl/final]" \
  --json "$DEMO/ablations/tau.json" 2>&1 | tee -a "$DEMO/logs/ablation_tau.log"
.venv/bin/python - "$DEMO" <<'PY'
import sys
from pathlib import Path
from draftopd.report import tau_curves
out = Path(sys.argv[1])
runs = {"SFT continued (matched updates)": out / "sft_continued", "Draft-OPD": out / "opd",
        "OPD, random anchors": out / "ablations/random_anchors", "OPD, no rejected stream": out / "ablations/no_rejected",
        "OPD, first rejected only": out / "variants/opd_rej_first", "OPD, full-vocabulary KL": out / "variants/opd_full_kl"}
print(tau_curves(runs, out / "figures/opd_ablations.png", "tau on held-out GSM8K vs target tokens, from the SFT drafter"))
PY
