#!/usr/bin/env bash
# Commit what the pool generation (scripts/pool_generate.sh) has finished: new shards, their manifests and the cards
# (scripts/pool_card.py), in one small commit on the current branch, touching nothing outside pools/. Safe while the
# generation runs (shards and manifests are renamed into place whole; a shard whose manifest record is not written
# yet is committed with the next one). Run it now and then, e.g. every hour:
#   bash scripts/pool_commit.sh          # PY overrides the interpreter (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
summary=$("$PY" scripts/pool_card.py)
git add pools
if git diff --cached --quiet -- pools; then
  echo "pools: nothing new"
  exit 0
fi
new=$(git diff --cached --name-only --diff-filter=A -- 'pools/*.u16.xz' | sed -E 's#pools/smollm2-135m-instruct/##; s#/shard_#:#; s#\.u16\.xz##' | tr '\n' ' ')
git commit -q -m "pools: ${new:-cards and manifests }(${summary#*: })" -- pools
git log --oneline -1
