#!/usr/bin/env bash
# Chooses how the confidence-aware router blends (--uncertain, --soup-k) on the train split
# (5 prompts per task), in domain and out of domain, never on test prompts. The calibration
# (pools/bigbench/confidence.json) is itself fitted on the train split:
#   loraretriever calibrate --pool pools/bigbench --queries data/bigbench --split train --json
# Usage: tune_uncertain.sh [CONFIG...] (default: all of keep soup10 soup28 soup28domain base reference)
set -euo pipefail
W="--weighting softmax --routing-temperature 0.02"
eval_train() {  # output file, flags
  local out=$1; shift
  loraretriever eval-tasks --pool pools/bigbench --queries data/bigbench --split train --limit 5 \
    --max-new-tokens 16 $W "$@" --json > "results/tasks/tuning/$out.json"
}
run() {  # config
  local methods="--methods retriever_mixture_k3 retriever_fusion_k3"
  case $1 in
    keep) flags=() ;;
    soup10) flags=(--uncertain soup --soup-k 10) ;;
    soup28) flags=(--uncertain soup --soup-k 28) ;;
    soup28domain) flags=(--uncertain soup --soup-k 28 --soup-of domain) ;;
    base) flags=(--uncertain base) ;;
    reference) eval_train uncertain_reference_ood --ood --methods adaptersoup base; return ;;
    *) echo "unknown config $1" >&2; exit 2 ;;
  esac
  eval_train "uncertain_$1" ${flags[@]+"${flags[@]}"} $methods
  eval_train "uncertain_$1_ood" --ood ${flags[@]+"${flags[@]}"} $methods
}
for config in "${@:-keep soup10 soup28 soup28domain base reference}"; do
  for c in $config; do run "$c"; done
done
