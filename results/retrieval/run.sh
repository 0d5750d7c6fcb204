#!/usr/bin/env bash
# Reproduces results/retrieval/*.json: frozen baseline, fine-tuned on all 48 tasks, fine-tuned on 40%
# of the tasks (scored on the other 60%). Training uses the cards plus the "even" half of test_dev.json
# (every other prompt of each task); every number is reported on the "odd" half.
# Usage: results/retrieval/run.sh [MODELS_DIR]   (from the repository root; ~30 CPU minutes on 2 cores)
set -euo pipefail
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DATA=../shared/data/loraretriever-flan48
OUT=results/retrieval
MODELS=${1:-/tmp/loraretriever-retrievers}
LR=".venv/bin/loraretriever"
T=2
mkdir -p "$MODELS"
last() { tail -n 1; }

# 1. Frozen all-MiniLM-L6-v2 (the paper's reference point), on the report half.
$LR eval-retrieval --cards $DATA/lora_samples.json --queries $DATA/test_dev.json --split odd --threads $T --json \
  | last > $OUT/frozen_odd.json

# 2. Fine-tuned on all 48 tasks.
rm -rf "$MODELS/all48"
$LR train-retriever --cards $DATA/lora_samples.json --queries $DATA/test_dev.json --query-split even \
  --train-fraction 1.0 --seed 0 --epochs 1 --pairs-per-sample 2 --batch-size 32 --threads $T --no-progress \
  --out "$MODELS/all48" --json | last > $OUT/train_all48.json
$LR eval-retrieval --cards $DATA/lora_samples.json --queries $DATA/test_dev.json --split odd \
  --embedder "$MODELS/all48" --threads $T --json | last > $OUT/finetuned_all48_odd.json

# 3. Fine-tuned on 40% of the tasks; scored on the other 60% (unseen tasks), against frozen on the same queries.
rm -rf "$MODELS/frac40"
$LR train-retriever --cards $DATA/lora_samples.json --queries $DATA/test_dev.json --query-split even \
  --train-fraction 0.4 --seed 0 --epochs 1 --pairs-per-sample 2 --batch-size 32 --threads $T --no-progress \
  --out "$MODELS/frac40" --json | last > $OUT/train_frac40.json
cp "$MODELS/frac40/heldout_tasks.txt" $OUT/frac40_heldout_tasks.txt
$LR eval-retrieval --cards $DATA/lora_samples.json --queries $DATA/test_dev.json --split odd \
  --embedder "$MODELS/frac40" --tasks-file $OUT/frac40_heldout_tasks.txt --threads $T --json \
  | last > $OUT/finetuned_frac40_unseen_odd.json
$LR eval-retrieval --cards $DATA/lora_samples.json --queries $DATA/test_dev.json --split odd \
  --tasks-file $OUT/frac40_heldout_tasks.txt --threads $T --json | last > $OUT/frozen_frac40_unseen_odd.json

# 4. Latency: batch of 32 real prompts over 10,000 registered LoRAs.
$LR bench retrieval --queries $DATA/test_dev.json --loras 10000 --batch 32 --threads $T --json | last > $OUT/bench.json
echo done
