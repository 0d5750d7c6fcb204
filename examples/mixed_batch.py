"""LangChain `.batch()` over mixed prompts: ONE batched generation, each prompt with its own LoRAs."""

from __future__ import annotations

from langchain_loraretriever import LoraRetrieverLLM
from loraretriever.demo_pool import demo_parser, open_demo_lm

PROMPTS = [
    "Translate to English: Der Zug kommt heute später an.",
    "Is the sentiment of this review positive or negative? an utterly charming and funny film",
    'Premise: "A dog runs on the beach." Hypothesis: "An animal is outside." Does the premise entail the hypothesis?',
    'Are these questions the same? "How do I learn Python fast?" and "What is the quickest way to learn Python?"',
]


def main() -> None:
    parser = demo_parser(__doc__)
    args = parser.parse_args()

    lm = open_demo_lm(args.pool_dir, train_steps=args.train_steps)
    llm = LoraRetrieverLLM(lm=lm, max_new_tokens=20, chat_template=True)
    before = lm.generations
    result = llm.generate(PROMPTS)
    for prompt, generation in zip(PROMPTS, result.generations, strict=True):
        info = generation[0].generation_info
        print(f"{prompt[:70]!r}\n  -> {info['routing_str']}\n  => {generation[0].text.strip()!r}")
    print(f"batched generations run: {lm.generations - before}")
    lm.close()


if __name__ == "__main__":
    main()
