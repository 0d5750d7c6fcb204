#!/usr/bin/env bash
# The unseen-task experiment (train on 40% of the tasks, score on the other 60%) repeated on other
# random task splits, with the recipe chosen on seed 0 (run.sh / tune_frac40.sh) unchanged: one
# split's 29 held-out tasks are too few to tell a +4 from a +6 (halves differ by 2 points).
# Usage: results/retrieval/seeds.sh [MODELS_DIR] [SEED...]   (~5 CPU minutes per seed on 2 cores)
set -euo pipefail
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DATA=../shared/data/loraretriever-flan48
OUT=results/retrieval/seeds
MODELS=${1:-/tmp/loraretriever-retrievers}
shift || true
LR=".venv/bin/loraretriever"
mkdir -p "$MODELS" $OUT
for seed in "${@:-1 2}"; do
  for s in $seed; do
    rm -rf "$MODELS/frac40_seed$s"
    $LR train-retriever --cards $DATA/lora_samples.json --queries $DATA/test_dev.json --query-split even \
      --train-fraction 0.4 --seed "$s" --epochs 1 --pairs-per-sample 2 --batch-size 32 --threads 2 --no-progress \
      --out "$MODELS/frac40_seed$s" --json | tail -n 1 > $OUT/train_frac40_seed$s.json
    held="$MODELS/frac40_seed$s/heldout_tasks.txt"
    for half in even odd; do
      $LR eval-retrieval --cards $DATA/lora_samples.json --queries $DATA/test_dev.json --split $half \
        --tasks-file "$held" --threads 2 --json | tail -n 1 > $OUT/frozen_seed${s}_unseen_$half.json
      $LR eval-retrieval --cards $DATA/lora_samples.json --queries $DATA/test_dev.json --split $half \
        --tasks-file "$held" --embedder "$MODELS/frac40_seed$s" --threads 2 --json | tail -n 1 \
        > $OUT/finetuned_seed${s}_unseen_$half.json
    done
  done
done
echo done
