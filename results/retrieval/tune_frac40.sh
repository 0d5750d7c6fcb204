#!/usr/bin/env bash
# Hyper-parameter selection for the 40% -> unseen 60% experiment, without touching the report half:
# each variant is trained on the 40% tasks (cards + their "even" queries) and validated on the EVEN
# queries of the held-out tasks (never trained on); the chosen variant is then scored on the ODD half.
set -euo pipefail
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DATA=../shared/data/loraretriever-flan48
OUT=results/retrieval/tuning
MODELS=${1:-/tmp/loraretriever-retrievers}
LR=".venv/bin/loraretriever"
mkdir -p $OUT
HELD=results/retrieval/frac40_heldout_tasks.txt
$LR eval-retrieval --cards $DATA/lora_samples.json --queries $DATA/test_dev.json --split even --tasks-file $HELD \
  --threads 2 --json | tail -n 1 > $OUT/frozen_frac40_unseen_even.json
$LR eval-retrieval --cards $DATA/lora_samples.json --queries $DATA/test_dev.json --split even --tasks-file $HELD \
  --embedder "$MODELS/frac40" --threads 2 --json | tail -n 1 > $OUT/frac40_e1_unseen_even.json
for variant in "e2:--epochs 2" "e2lr1e-4:--epochs 2 --lr 1e-4" "p4:--pairs-per-sample 4" "len64:--max-seq-length 64"; do
  name=${variant%%:*}; flags=${variant#*:}
  rm -rf "$MODELS/frac40_$name"
  $LR train-retriever --cards $DATA/lora_samples.json --queries $DATA/test_dev.json --query-split even \
    --train-fraction 0.4 --seed 0 --pairs-per-sample 2 --batch-size 32 --threads 2 --no-progress $flags \
    --out "$MODELS/frac40_$name" --json | tail -n 1 > $OUT/train_frac40_$name.json
  $LR eval-retrieval --cards $DATA/lora_samples.json --queries $DATA/test_dev.json --split even --tasks-file $HELD \
    --embedder "$MODELS/frac40_$name" --threads 2 --json | tail -n 1 > $OUT/frac40_${name}_unseen_even.json
done
echo done
