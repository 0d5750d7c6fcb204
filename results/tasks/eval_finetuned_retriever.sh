#!/usr/bin/env bash
# The confidence-aware router with an embedder fine-tuned on the demo pool's own tasks, on the whole
# test split. Nothing is chosen on test: the training recipe is the one chosen on flan48
# (results/retrieval/), the routing settings those chosen on the train split (tune_uncertain.sh).
#  1. fine-tune MiniLM on the pool's cards + the EVEN half of each task's train prompts;
#  2. a copy of the pool indexed with it, calibrated on the ODD half of the train prompts
#     (prompts the embedder never saw, so the confidence is not fitted on memorised similarities);
#  3. eval-tasks on the whole test split, in domain. Out of domain this retriever would leak (it has
#     seen every task): eval_finetuned_retriever_ood.sh measures OOD with two folds instead.
# Usage: results/tasks/eval_finetuned_retriever.sh [WORK_DIR]   (~50 minutes on 2 busy cores: 30 training, 3 calibrating, 12 evaluating)
set -euo pipefail
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=${1:-/tmp/loraretriever-bigbench-retriever}
OUT=results/tasks/finetuned_retriever
LR="loraretriever"
mkdir -p "$WORK" $OUT
rm -rf "$WORK/embedder" "$WORK/pool"
$LR train-retriever --cards pools/bigbench --queries data/bigbench --split train --query-split even \
  --epochs 1 --pairs-per-sample 2 --batch-size 32 --threads 2 --no-progress --out "$WORK/embedder" --json \
  | tail -n 1 > $OUT/train_retriever.json
mkdir -p "$WORK/pool"
cp -r pools/bigbench/adapters pools/bigbench/cards pools/bigbench/pool.json "$WORK/pool/"
$LR reindex --pool "$WORK/pool" --embedder "$WORK/embedder" --json | tail -n 1
$LR calibrate --pool "$WORK/pool" --embedder "$WORK/embedder" --queries data/bigbench --split train \
  --query-split odd --json | tail -n 1 > $OUT/calibrate.json
W="--weighting softmax --routing-temperature 0.02"
U="--uncertain soup --soup-k 28 --soup-of domain"
E="$LR eval-tasks --pool $WORK/pool --embedder $WORK/embedder --queries data/bigbench --max-new-tokens 16 $W"
$E $U --methods retriever_mixture_k3 --report $OUT --json > $OUT/eval_test.json
echo done
