#!/usr/bin/env bash
# Chooses, on the TRAIN split only, how the fold retrievers of eval_finetuned_retriever_ood.sh are
# calibrated and which soup an unsure prompt gets, out of domain: each fold's retriever routes the
# other fold's train prompts (10 per task) with their own LoRA removed.
#   fold: calibrated on its own (trained) tasks' train prompts, as eval_finetuned_retriever_ood.sh
#   all:  calibrated on every pool task's train prompts (the frozen router's protocol: the pool
#         owner calibrates on all the pool's tasks, including those the retriever was not trained on)
# Needs the work dir of eval_finetuned_retriever_ood.sh (its embedder_X and pool_X).
# Usage: results/tasks/tune_finetuned_ood.sh [WORK_DIR]   (~30 CPU minutes on 2 cores)
set -euo pipefail
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=${1:-/tmp/loraretriever-bigbench-retriever}
FOLDS=results/tasks/finetuned_retriever
OUT=results/tasks/tuning/finetuned_ood
LR="loraretriever"
mkdir -p $OUT
W="--weighting softmax --routing-temperature 0.02"
for fold in a b; do
  other=$([ $fold = a ] && echo b || echo a)
  rm -rf "$WORK/pool_${fold}_all"
  cp -r "$WORK/pool_$fold" "$WORK/pool_${fold}_all"
  $LR calibrate --pool "$WORK/pool_${fold}_all" --embedder "$WORK/embedder_$fold" --queries data/bigbench --split train \
    --query-split odd --json | tail -n 1 > $OUT/calibrate_${fold}_all.json
  ev() {  # output name, pool, flags...
    local name=$1 pool=$2; shift 2
    $LR eval-tasks --pool "$pool" --embedder "$WORK/embedder_$fold" --queries data/bigbench --split train --limit 10 \
      --max-new-tokens 16 --ood --tasks-file $FOLDS/fold_$other.txt "$@" --json > $OUT/${name}_$other.json
  }
  ev keep "$WORK/pool_$fold" $W --methods retriever_mixture_k3 adaptersoup
  ev fold_domain "$WORK/pool_$fold" $W --uncertain soup --soup-k 28 --soup-of domain --methods retriever_mixture_k3
  ev all_domain "$WORK/pool_${fold}_all" $W --uncertain soup --soup-k 28 --soup-of domain --methods retriever_mixture_k3
  ev all_nearest "$WORK/pool_${fold}_all" $W --uncertain soup --soup-k 28 --methods retriever_mixture_k3
done
python3 - <<'PY'
import json
out = "results/tasks/tuning/finetuned_ood"
def mean(name, method="retriever_mixture_k3"):
    by_task = {}
    for half in "ab":
        by_task.update(json.load(open(f"{out}/{name}_{half}.json"))["methods"][method]["by_task"])
    return round(sum(by_task.values()) / len(by_task), 4)
rows = {"adaptersoup": mean("keep", "adaptersoup")}
rows.update({name: mean(name) for name in ("keep", "fold_domain", "all_domain", "all_nearest")})
json.dump(rows, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(rows))
PY
