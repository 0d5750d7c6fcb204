#!/usr/bin/env bash
# The LoRA-Flow gate trained longer on the train split (1,000 examples, 300 steps, against the
# committed gate's 200 examples and 50 steps, whose loss barely moved), then flow_k3 on the whole
# test split beside retriever_mixture_k3 (0.4255, eval_fusion_test.json) with the same frozen router.
# Nothing chosen on test: one configuration, trained on a copy of the pool (the committed gate stays).
# Usage: results/tasks/eval_flow_long.sh [WORK_DIR]
set -euo pipefail
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=${1:-/tmp/loraretriever-flow-long}
W="--weighting softmax --routing-temperature 0.02"
rm -rf "$WORK" && mkdir -p "$WORK/pool"
cp -r pools/bigbench/adapters pools/bigbench/cards pools/bigbench/pool.json "$WORK/pool/"
loraretriever reindex --pool "$WORK/pool" --json | tail -n 1
loraretriever train-gate --kind flow --pool "$WORK/pool" --data data/bigbench --split train --examples 1000 \
  --steps 300 $W | tail -n 1 > results/tasks/train_gate_flow_long.json
loraretriever eval-tasks --pool "$WORK/pool" --queries data/bigbench --max-new-tokens 16 $W --methods flow_k3 \
  --json > results/tasks/eval_flow_long_test.json
echo done
