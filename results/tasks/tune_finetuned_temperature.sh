#!/usr/bin/env bash
# With the pool's fine-tuned retriever (eval_finetuned_retriever.sh, run first) the nearest card's
# lead grows, so softmax weights at the frozen embedder's temperature (0.02) are nearly one-hot and
# the mixture is the top-1 LoRA alone. Does blending in the neighbours pay? Chosen on the train
# split (5 prompts per task), in domain, never on test prompts.
# Usage: results/tasks/tune_finetuned_temperature.sh [WORK_DIR]
set -euo pipefail
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=${1:-/tmp/loraretriever-bigbench-retriever}
OUT=results/tasks/finetuned_retriever/tuning
mkdir -p $OUT
U="--uncertain soup --soup-k 28 --soup-of domain"
for t in 0.02 0.05 0.1 uniform; do
  if [ $t = uniform ]; then W="--weighting uniform"; else W="--weighting softmax --routing-temperature $t"; fi
  loraretriever eval-tasks --pool "$WORK/pool" --embedder "$WORK/embedder" --queries data/bigbench --split train \
    --limit 5 --max-new-tokens 16 $W $U --methods retriever_mixture_k3 --json > $OUT/temperature_$t.json
done
echo done
