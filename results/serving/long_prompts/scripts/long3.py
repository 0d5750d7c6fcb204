import json, sys, torch, threading, random
from loraretriever.engine.base_model import load_base_model
from loraretriever.evaluation.bench_long import run_long_prompt
from loraretriever.evaluation.workload import task_pool, random_lora_state_dict, lora_config, tokens_per_second
from loraretriever.engine.composer import Composer
from loraretriever.pool.lora_pool import LoraPool
from loraretriever.retrieval.router import Router
from loraretriever.serving.routed_lm import RoutedLM

model, tok = load_base_model()
pool, cards = task_pool(model, torch.Generator().manual_seed(0))
router = Router.from_cards(cards)
make = lambda **o: RoutedLM(model, tok, pool, router, max_wait_ms=0, **o)


def long():
    out = run_long_prompt(make, model, tok, rounds=3, log=lambda m: None)
    print(json.dumps({k: out[k] for k in ("seconds", "ratio_to_hf_generate")}), flush=True)


g = torch.Generator().manual_seed(0)
sized = LoraPool(model)
for i in range(1000):
    sized.add_state_dict(f"lora{i:04d}", lora_config(8), random_lora_state_dict(model, 8, g))
c = Composer(model, sized)
c.remove_hooks()
del c, sized
import gc

gc.collect()
print("pool done", flush=True)
long()
