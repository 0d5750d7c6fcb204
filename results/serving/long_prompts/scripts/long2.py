import json, sys, torch, threading
from loraretriever.engine.base_model import load_base_model
from loraretriever.evaluation.bench_long import run_long_prompt
from loraretriever.evaluation.bench_serve import _mixed
from loraretriever.evaluation.workload import task_pool
from loraretriever.retrieval.router import Router
from loraretriever.serving.routed_lm import RoutedLM

model, tok = load_base_model()
pool, cards = task_pool(model, torch.Generator().manual_seed(0))
router = Router.from_cards(cards)
make = lambda **o: RoutedLM(model, tok, pool, router, max_wait_ms=0, **o)


def long():
    out = run_long_prompt(make, model, tok, rounds=3, log=lambda m: None)
    print(json.dumps({k: out[k] for k in ("seconds", "ratio_to_hf_generate")}), flush=True)


long()
_mixed(model, tok, "/work/shared/data/loraretriever-flan48/test_dev.json", 8, 24, [0.6], 0, lambda m: None)
print("threads", [t.name for t in threading.enumerate()], flush=True)
long()
