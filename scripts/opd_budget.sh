#!/usr/bin/env bash
# docs/RESULTS.md section 6, on top of a finished `make demo` run that also holds the 20-update arms of
# section 5 (DEMO/long/opd, DEMO/long/sft_continued): the continued arms started from the SFT training
# checkpoint (AdamW moments carried) at two learning rates, both 20-update arms continued to 40 updates, and
# held-out tau of every arm on the first N prompts of GSM8K test_dev, HumanEval and MT-bench (batched, untimed),
# each against SFT or its control with a paired 95% interval over prompts.
# Usage: scripts/opd_budget.sh [DEMO_OUT] [PROMPTS] [OUT]     (e.g. nohup scripts/opd_budget.sh &; ~90 min here)
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${1:-runs/demo}
N=${2:-32}
OUT=${3:-runs/opd_budget}
D=.venv/bin/draftopd
CK=$DEMO/sft/checkpoints/$(ls "$DEMO/sft/checkpoints" | grep '^step_' | sort | tail -1)
TAU=(bench --set tau_only=true --set "limit=$N" --set batch_size=16 --set sampling.max_new_tokens=96
  --set hf_baseline=false --set datasets=gsm8k,humaneval,mtbench)
mkdir -p "$OUT"
for LR in 3e-4 1e-4; do  # 10 updates each from the SFT training checkpoint, moments carried
  $D train opd --config "$DEMO/configs/opd.yaml" --set "init_from=$CK" --set "out=$OUT/opd10_lr$LR" --set "lr=$LR"
  $D train sft --config "$DEMO/configs/sft_continued.yaml" --set "init_from=$CK" --set "out=$OUT/cont10_lr$LR" \
    --set "data=$DEMO/data" --set "lr=$LR"
  $D "${TAU[@]}" --set "methods=[SFT continued lr $LR=$OUT/cont10_lr$LR/final,OPD lr $LR=$OUT/opd10_lr$LR/final]" \
    --json "$OUT/tau10_lr$LR.json"
done
# 20 more updates for both 20-update arms (weights and moments from step 20; the schedule restarts)
$D train opd --config "$DEMO/configs/opd.yaml" --set "init_from=$DEMO/long/opd/checkpoints/step_000020" \
  --set "out=$OUT/opd40" --set max_steps=20 --set eval_every=5
$D train sft --config "$DEMO/configs/sft_continued.yaml" --set "data=$DEMO/data" \
  --set "init_from=$DEMO/long/sft_continued/checkpoints/step_000020" --set "out=$OUT/cont40" --set max_steps=20 --set eval_every=5
$D "${TAU[@]}" --json "$OUT/tau_demo_drafters.json" --set "methods=[SFT=$DEMO/sft/final,Draft-OPD 10 (demo)=$DEMO/opd/final,SFT continued 20=$DEMO/long/sft_continued/final,Draft-OPD 20=$DEMO/long/opd/final]"
$D "${TAU[@]}" --json "$OUT/tau40.json" --set "methods=[SFT=$DEMO/sft/final,SFT continued 40=$OUT/cont40/final,Draft-OPD 40=$OUT/opd40/final]" \
  --plot "$OUT/tau40.png"
