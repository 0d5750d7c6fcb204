#!/usr/bin/env bash
# Chooses the TIES / DARE density on the train split (5 prompts per task), never on test prompts.
set -euo pipefail
W="--weighting softmax --routing-temperature 0.02"
for d in 0.3 0.5 0.7; do
  loraretriever eval-tasks --pool pools/bigbench --queries data/bigbench --split train --limit 5 \
    --max-new-tokens 16 $W --density "$d" \
    --methods retriever_fusion_k3 retriever_fusion_ties_k3 retriever_fusion_dare_linear_k3 retriever_fusion_dare_ties_k3 \
    --json > "results/tasks/tuning/fusion_density_$d.json"
done
