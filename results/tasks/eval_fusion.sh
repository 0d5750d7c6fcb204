#!/usr/bin/env bash
# The fusion rows on the whole test split (1,450 prompts of 29 tasks), each TIES / DARE density the
# best of 0.3 / 0.5 / 0.7 on the train split (tune_fusion_density.sh; ties 0.5, dare_linear 0.5, dare_ties 0.3).
set -euo pipefail
W="--weighting softmax --routing-temperature 0.02"
loraretriever eval-tasks --pool pools/bigbench --queries data/bigbench --max-new-tokens 16 $W --density 0.5 \
  --methods retriever_mixture_k3 retriever_fusion_k3 retriever_fusion_ties_k3 retriever_fusion_dare_linear_k3 \
  --json > results/tasks/eval_fusion_test.json
loraretriever eval-tasks --pool pools/bigbench --queries data/bigbench --max-new-tokens 16 $W --density 0.3 \
  --methods retriever_fusion_dare_ties_k3 --json > results/tasks/eval_fusion_dare_ties_test.json
