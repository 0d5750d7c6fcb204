"""`make demo`: a LangChain `.batch()` over mixed-task prompts, every prompt routed to its own LoRAs.

Loads SmolLM2-135M-Instruct and the committed pool of 28 BIG-bench task LoRAs (pools/bigbench) with
a Chroma index of their cards, and answers 16 mixed prompts from the tasks' held-out test splits in
ONE batched generation, next to the same batch on the base model alone.
"""

from __future__ import annotations

import time

from demo_pool import demo_parser, find_bigbench_splits, open_demo_lm

from langchain_loraretriever import LoraRetrieverLLM
from loraretriever.evaluation.tasks import score
from loraretriever.retrieval.queries import load_split_queries


def mixed_prompts(n: int) -> list[dict]:
    """``n`` test prompts of ``n`` different tasks, cycling through the task kinds so every kind shows."""
    by_kind: dict[str, dict[str, dict]] = {}
    for query in load_split_queries(find_bigbench_splits()):
        by_kind.setdefault(query["domain"], {}).setdefault(query["task"], query)  # each task's first prompt
    columns = [list(tasks.values()) for _, tasks in sorted(by_kind.items())]
    interleaved = [column[i] for i in range(max(map(len, columns))) for column in columns if i < len(column)]
    return interleaved[:n]


def _cell(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def main() -> None:
    parser = demo_parser(__doc__)
    parser.add_argument("--prompts", type=int, default=16, help="Mixed prompts in the batch (one per task).")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    lm = open_demo_lm(args.pool_dir)
    llm = LoraRetrieverLLM(lm=lm, max_new_tokens=args.max_new_tokens, chat_template=True)
    queries = mixed_prompts(args.prompts)
    prompts = [q["inputs"] for q in queries]

    start = time.perf_counter()
    routed = llm.generate(prompts)
    elapsed = time.perf_counter() - start
    base = llm.batch(prompts, adapters=[])  # the same batch on the base model alone

    print(f"\n{'#':>2}  {'prompt':<34} {'routed to (weight)':<46} {'output':<20} {'base model':<16} target")
    hits = {"routed": 0, "base": 0, "routing_top1": 0}
    tokens = 0
    for i, (query, generations, base_text) in enumerate(zip(queries, routed.generations, base, strict=True)):
        info = generations[0].generation_info
        text = generations[0].text
        tokens += info["completion_tokens"]
        adapters = info["routing"]["adapters"]
        hits["routing_top1"] += bool(adapters) and adapters[0] == query["task"]
        hits["routed"] += int(score(query["metric"], text, query["targets"]))
        hits["base"] += int(score(query["metric"], base_text, query["targets"]))
        routing = ", ".join(f"{a} {w:.2f}" for a, w in zip(adapters, info["routing"]["weights"], strict=True))
        print(
            f"{i:>2}  {_cell(query['inputs'], 34):<34} {_cell(routing, 46):<46} {_cell(text, 20):<20} "
            f"{_cell(base_text, 16):<16} {_cell(query['targets'], 24)}"
        )
    n = len(queries)
    print(
        f"\nrouting: the prompt's own task LoRA ranked first for {hits['routing_top1']}/{n} prompts"
        f"\nexact match: routed LoRAs {hits['routed']}/{n}, base model {hits['base']}/{n}"
        f"\none batched generation: {n} prompts, {tokens} new tokens in {elapsed:.1f} s ({tokens / elapsed:.1f} tokens/s)"
    )
    lm.close()


if __name__ == "__main__":
    main()
