"""An LCEL chain that switches task step by step on ONE LLM object: every step is routed anew.

unscramble a word -> sort it alphabetically among other words -> recognise the intent of an utterance
that uses it.
"""

from __future__ import annotations

from demo_pool import demo_parser, open_demo_lm
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

from langchain_loraretriever import LoraRetrieverLLM

SCRAMBLED = "lpepa"


def main() -> None:
    parser = demo_parser(__doc__)
    args = parser.parse_args()

    lm = open_demo_lm(args.pool_dir)
    llm = LoraRetrieverLLM(lm=lm, max_new_tokens=32, chat_template=True)
    routes: list[str] = []

    def traced(step: str):
        """Runs the LLM and records which LoRAs the step was routed to."""

        def call(prompt) -> str:
            result = llm.generate([prompt.to_string()])
            routes.append(f"{step}: {result.generations[0][0].generation_info['routing_str']}")
            return result.generations[0][0].text.strip()

        return RunnableLambda(call)

    unscramble = (
        PromptTemplate.from_template("The word {scrambled} is a scrambled version of the English word")
        | traced("unscramble")
        | StrOutputParser()
    )
    sort = PromptTemplate.from_template("zebra {word} mango kiwi") | traced("sort") | StrOutputParser()
    intent = (
        PromptTemplate.from_template(
            "Utterance: Add the song {word} pie to my road trip playlist.\nOptions:\n- get_weather\n"
            "- add_to_playlist\n- book_restaurant\n- rate_book"
        )
        | traced("intent")
        | StrOutputParser()
    )
    chain = (
        RunnablePassthrough.assign(word=unscramble)
        | RunnablePassthrough.assign(sorted_words=sort)
        | RunnablePassthrough.assign(intent=intent)
    )
    result = chain.invoke({"scrambled": SCRAMBLED})
    for key in ("word", "sorted_words", "intent"):
        print(f"{key}: {result[key]!r}")
    print("\n".join(routes))
    lm.close()


if __name__ == "__main__":
    main()
