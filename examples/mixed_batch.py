"""LangChain `.batch()` over mixed prompts: ONE batched generation, each prompt with its own LoRAs."""

from __future__ import annotations

from demo_pool import demo_parser, open_demo_lm

from langchain_loraretriever import LoraRetrieverLLM

PROMPTS = [
    "The word lpepa is a scrambled version of the English word",
    "I have a piano, two flutes, and a violin. How many musical instruments do I have?",
    "Utterance: Book a table for two at an Italian restaurant tonight.\nOptions:\n- get_weather\n- book_restaurant"
    "\n- play_music\n- rate_book",
    "zebra apple mango kiwi",
]


def main() -> None:
    parser = demo_parser(__doc__)
    args = parser.parse_args()

    lm = open_demo_lm(args.pool_dir)
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
