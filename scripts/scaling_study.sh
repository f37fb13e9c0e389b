#!/usr/bin/env bash
# docs/RESULTS.md section 8: tau of DFlash and EAGLE-3 drafters against SFT training tokens.
# For each kind, SFT runs at STEPS optimizer steps (each a full run with its own warm-up and cosine schedule,
# same data, same batch, so the budgets differ only in steps = target tokens trained on), then every drafter's
# held-out tau on the first N prompts of GSM8K test_dev, HumanEval and MT-bench (batched, greedy, untimed, in one
# `draftopd bench` call so the prompts pair), then the table, the log-x figure and the extrapolation
# (`python -m draftopd.lab.study OUT`). Every stage is resumable: a finished run is skipped (its `final/`
# exists), an interrupted one resumes from its checkpoint, and the target's features are computed once per kind
# (the later runs of a kind link the first run's `features.pt`, which the trainer checks against its data key).
# A budget can be a finished run made elsewhere: REUSE="eagle3-960=runs/reproduce/sft" (the default: `make
# reproduce`'s SFT stage is the same recipe at 960 steps) links it as OUT/eagle3-960 when it has a final/.
# Usage: scripts/scaling_study.sh [DATA] [OUT] [N]   (nohup ... > OUT.log &; `tail -f OUT.log`)
# Env: STEPS_dflash (default "5 15 60 240": 48x), STEPS_eagle3 ("15 40 120 960": 64x), KINDS ("dflash eagle3"),
#      REUSE, SFT_SET (extra --set flags for every run), BENCH=0 (train only).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-runs/reproduce/data}
OUT=${2:-runs/scaling}
N=${3:-32}
STEPS_dflash=${STEPS_dflash:-"5 15 60 240"}
STEPS_eagle3=${STEPS_eagle3:-"15 40 120 960"}
KINDS=${KINDS:-"dflash eagle3"}
REUSE=${REUSE:-"eagle3-960=runs/reproduce/sft"}
D=.venv/bin/draftopd
mkdir -p "$OUT"
for pair in $REUSE; do
  name=${pair%%=*} src=${pair#*=}
  if [ ! -e "$OUT/$name" ] && [ -f "$src/final/config.json" ]; then ln -s "$(realpath "$src")" "$OUT/$name"; fi
done
methods=()
for kind in $KINDS; do
  first=""  # a run of this kind whose target features exist (a reused run, else the first one trained)
  per_kind="STEPS_$kind"
  for s in ${!per_kind}; do
    if [ -z "$first" ] && [ -f "$OUT/$kind-$s/features.pt" ]; then first=$OUT/$kind-$s; fi
  done
  for s in ${!per_kind}; do
    run=$OUT/$kind-$s
    if [ ! -f "$run/final/config.json" ]; then
      if [ -n "$first" ] && [ -f "$first/features.pt" ] && [ ! -e "$run/features.pt" ]; then
        mkdir -p "$run" && ln "$first/features.pt" "$run/features.pt"
      fi
      echo "== $(date +%T) SFT $kind $s steps -> $run"
      $D train sft --config "configs/sft-$kind.yaml" --set "data=$DATA" --set "out=$run" --set "loop.max_steps=$s" \
        --set "loop.eval_every=$s" --set "loop.save_every=$(( s < 50 ? s : 50 ))" --set eval.limit=8 --set eval.max_new_tokens=64 \
        ${SFT_SET:-}
    fi
    first=${first:-$run}
    methods+=("$kind $s: {kind: path, path: $run/final}")
  done
done
[ "${BENCH:-1}" = 1 ] || exit 0  # BENCH=0: train only (e.g. a few budgets first)
list=$(IFS=,; echo "${methods[*]}")
if [ ! -f "$OUT/tau.json" ]; then
  echo "== $(date +%T) held-out tau, $N prompts per set"
  $D bench --set tau_only=true --set "limit=$N" --set batch_size=16 --set sampling.max_new_tokens=96 \
    --set hf_baseline=false --set datasets=gsm8k,humaneval,mtbench --set "methods={$list}" --json "$OUT/tau.json"
fi
.venv/bin/python -m draftopd.lab.study "$OUT"
