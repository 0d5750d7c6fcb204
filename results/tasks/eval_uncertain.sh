#!/usr/bin/env bash
# The confidence-aware router on the whole test split (29 tasks x 50 = 1,450 prompts), with every
# setting chosen on the train split (results/tasks/tune_uncertain.sh: soup of 28, by domain).
set -euo pipefail
W="--weighting softmax --routing-temperature 0.02"
U="--uncertain soup --soup-k 28 --soup-of domain"
E="loraretriever eval-tasks --pool pools/bigbench --queries data/bigbench --max-new-tokens 16 $W"
mkdir -p results/tasks/uncertain
$E $U --ood --methods retriever_mixture_k3 adaptersoup base --report results/tasks/uncertain --json \
  > results/tasks/eval_uncertain_ood_test.json
$E $U --methods oracle retriever_mixture_k3 --report results/tasks/uncertain --json \
  > results/tasks/eval_uncertain_test.json
# the same mixture without the confidence (the paper's router), out of domain, for comparison
$E --ood --methods retriever_mixture_k3 --json > results/tasks/eval_keep_ood_test.json
