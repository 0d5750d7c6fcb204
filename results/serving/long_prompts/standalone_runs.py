"""bench serve's long_prompt in a process of its own: ``plain`` (twice), ``after-mixed`` (before and
after the mixed workload in one process) or ``after-pool`` (after a 1,000-adapter pool was built
and dropped); ``mixed``: bench serve's mixed workload (32 prompts, 64 new tokens) alone. Run: ``LORARETRIEVER_HOME=$PWD/.home .venv/bin/python <this file> plain``."""

import gc
import json
import sys

import torch

from loraretriever.engine.base_model import load_base_model
from loraretriever.engine.composer import Composer
from loraretriever.evaluation.bench_long import run_long_prompt
from loraretriever.evaluation.bench_serve import _mixed
from loraretriever.evaluation.workload import lora_config, random_lora_state_dict, task_pool
from loraretriever.pool.lora_pool import LoraPool
from loraretriever.retrieval.router import Router
from loraretriever.serving.routed_lm import RoutedLM

QUERIES = "../shared/data/loraretriever-flan48/test_dev.json"

model, tokenizer = load_base_model()
pool, cards = task_pool(model, torch.Generator().manual_seed(0))
router = Router.from_cards(cards)


def make(**options):
    return RoutedLM(model, tokenizer, pool, router, max_wait_ms=0, **options)


def long() -> None:
    out = run_long_prompt(make, model, tokenizer, rounds=3, log=lambda message: None)
    print(json.dumps({key: out[key] for key in ("seconds", "ratio_to_hf_generate")}), flush=True)


mode = sys.argv[1]
if mode == "plain":
    long()
    long()
elif mode == "after-mixed":
    long()
    _mixed(model, tokenizer, QUERIES, 8, 24, [0.6], 0, lambda message: None)
    long()
elif mode == "mixed":
    out = _mixed(model, tokenizer, QUERIES, 32, 64, [0.6], 0, lambda message: None)
    print(json.dumps({key: out[key] for key in ("batch_s", "invoke_loop_s", "batch_vs_loop", "same_outputs")}))
elif mode == "after-pool":
    generator, sized = torch.Generator().manual_seed(0), LoraPool(model)
    for i in range(1000):
        sized.add_state_dict(f"lora{i:04d}", lora_config(8), random_lora_state_dict(model, 8, generator))
    Composer(model, sized).remove_hooks()
    del sized
    gc.collect()
    long()
