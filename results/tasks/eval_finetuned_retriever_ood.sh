#!/usr/bin/env bash
# Out of domain with a fine-tuned retriever, without leakage. A retriever fine-tuned on all 29
# tasks has seen every prompt's task, so removing the prompt's own LoRA (--ood) would not make
# the task unknown to the router: its prompts would look far from every card by construction.
# Here, two folds: a retriever fine-tuned (and calibrated) on one half of the tasks routes the
# other half's test prompts with their own LoRA removed, as a deployed pool meets a task it
# never saw. Same recipe and routing settings as eval_finetuned_retriever.sh; nothing chosen on test.
# Usage: results/tasks/eval_finetuned_retriever_ood.sh [WORK_DIR]   (~40 CPU minutes on 2 cores)
set -euo pipefail
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=${1:-/tmp/loraretriever-bigbench-retriever}
OUT=results/tasks/finetuned_retriever
LR="loraretriever"
mkdir -p "$WORK" $OUT
# the folds: the tasks in name order, alternately
ls data/bigbench/*.json | xargs -n1 basename | sed 's/\.json$//' | awk 'NR % 2 == 1' > $OUT/fold_a.txt
ls data/bigbench/*.json | xargs -n1 basename | sed 's/\.json$//' | awk 'NR % 2 == 0' > $OUT/fold_b.txt
W="--weighting softmax --routing-temperature 0.02"
U="--uncertain soup --soup-k 28 --soup-of domain"
for fold in a b; do
  other=$([ $fold = a ] && echo b || echo a)
  rm -rf "$WORK/embedder_$fold" "$WORK/pool_$fold"
  $LR train-retriever --cards pools/bigbench --queries data/bigbench --split train --query-split even \
    --tasks-file $OUT/fold_$fold.txt --epochs 1 --pairs-per-sample 2 --batch-size 32 --threads 2 --no-progress \
    --out "$WORK/embedder_$fold" --json | tail -n 1 > $OUT/train_retriever_$fold.json
  mkdir -p "$WORK/pool_$fold"
  cp -r pools/bigbench/adapters pools/bigbench/cards pools/bigbench/pool.json "$WORK/pool_$fold/"
  $LR reindex --pool "$WORK/pool_$fold" --embedder "$WORK/embedder_$fold" --json | tail -n 1
  $LR calibrate --pool "$WORK/pool_$fold" --embedder "$WORK/embedder_$fold" --queries data/bigbench --split train \
    --query-split odd --tasks-file $OUT/fold_$fold.txt --json | tail -n 1 > $OUT/calibrate_$fold.json
  $LR eval-tasks --pool "$WORK/pool_$fold" --embedder "$WORK/embedder_$fold" --queries data/bigbench \
    --max-new-tokens 16 $W $U --ood --tasks-file $OUT/fold_$other.txt --methods retriever_mixture_k3 --json \
    > $OUT/eval_ood_test_$other.json
done
# both halves together: the mean over the 29 tasks (50 test prompts each), beside adaptersoup's
python3 - <<'PY'
import json
out = "results/tasks/finetuned_retriever"
scores = {}
for half in "ab":
    scores.update(json.load(open(f"{out}/eval_ood_test_{half}.json"))["methods"]["retriever_mixture_k3"]["by_task"])
soup = json.load(open("results/tasks/eval_uncertain_ood_test.json"))["methods"]["adaptersoup"]["by_task"]
assert set(scores) == set(soup), "the two folds must cover the 29 tasks"
result = {
    "n_tasks": len(scores),
    "retriever_mixture_k3": round(sum(scores.values()) / len(scores), 4),
    "adaptersoup": round(sum(soup.values()) / len(soup), 4),
    "by_task": {task: {"router": scores[task], "adaptersoup": soup[task]} for task in sorted(scores)},
}
json.dump(result, open(f"{out}/eval_ood_test.json", "w"), indent=1)
print(json.dumps({k: v for k, v in result.items() if k != "by_task"}))
PY
