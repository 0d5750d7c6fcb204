"""`make demo`: a LangChain `.batch()` over mixed-task prompts, every prompt routed to its own LoRAs.

Loads SmolLM2-135M-Instruct, a pool of task LoRAs (trained on the paper's FLAN task samples on first
use, then cached under $LORARETRIEVER_HOME/demo_pool) with a Chroma index of their cards, and runs
16 mixed prompts from the paper's test set in ONE batched generation, next to the base model.
"""

from __future__ import annotations

import time

from langchain_loraretriever import LoraRetrieverLLM
from loraretriever.demo_pool import DEMO_TASKS, demo_parser, find_flan48, load_flan48_queries, open_demo_lm
from loraretriever.task_eval import score


def mixed_prompts(per_task: int) -> list[dict]:
    by_task: dict[str, list[dict]] = {}
    for query in load_flan48_queries(find_flan48(), DEMO_TASKS):
        by_task.setdefault(query["task"], []).append(query)
    rounds = [[rows[i] for rows in by_task.values() if i < len(rows)] for i in range(per_task)]
    return [q for round_ in rounds for q in round_]  # interleaved: every batch is mixed


def main() -> None:
    parser = demo_parser(__doc__)
    parser.add_argument("--per-task", type=int, default=4, help="Prompts per task (4 tasks).")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    lm = open_demo_lm(args.pool_dir, train_steps=args.train_steps)
    llm = LoraRetrieverLLM(lm=lm, max_new_tokens=args.max_new_tokens, chat_template=True)
    queries = mixed_prompts(args.per_task)
    prompts = [q["inputs"] for q in queries]

    start = time.perf_counter()
    routed = llm.generate(prompts)
    elapsed = time.perf_counter() - start
    base = llm.batch(prompts, adapters=[])  # the same batch on the base model alone

    print(f"\n{'#':>2}  {'task':<22} {'routed to (weight)':<48} {'output':<28} {'base model':<22} target")
    hits = {"routed": 0, "base": 0, "routing_top1": 0}
    scored = 0
    tokens = 0
    for i, (query, generations, base_text) in enumerate(zip(queries, routed.generations, base, strict=True)):
        info = generations[0].generation_info
        text = generations[0].text
        tokens += info["completion_tokens"]
        adapters = info["routing"]["adapters"]
        hits["routing_top1"] += bool(adapters) and adapters[0] == query["task"]
        routing = ", ".join(f"{a} {w:.2f}" for a, w in zip(adapters, info["routing"]["weights"], strict=True))
        if query["metric"] == "em":
            scored += 1
            hits["routed"] += int(score("em", text, query["targets"]))
            hits["base"] += int(score("em", base_text, query["targets"]))
        print(
            f"{i:>2}  {query['task']:<22} {routing:<48.48} {text.strip()!r:<28.28} {base_text.strip()!r:<22.22} "
            f"{query['targets']!r:.30}"
        )
    print(
        f"\nrouting: own task's LoRA ranked first for {hits['routing_top1']}/{len(queries)} prompts"
        f"\nexact match on the {scored} classification prompts: routed LoRAs {hits['routed']}/{scored}, "
        f"base model {hits['base']}/{scored}"
        f"\none batched generation: {len(prompts)} prompts, {tokens} new tokens in {elapsed:.1f} s "
        f"({tokens / elapsed:.1f} tokens/s)"
    )
    lm.close()


if __name__ == "__main__":
    main()
