"""An LCEL chain that switches task step by step on ONE LLM object: every step is routed anew.

translate (German -> English) -> classify the sentiment -> check that a paraphrase keeps the meaning.
"""

from __future__ import annotations

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

from langchain_loraretriever import LoraRetrieverLLM
from loraretriever.demo_pool import demo_parser, open_demo_lm

REVIEW_DE = "Der Film war wunderbar, die Schauspieler waren großartig."


def main() -> None:
    parser = demo_parser(__doc__)
    args = parser.parse_args()

    lm = open_demo_lm(args.pool_dir, train_steps=args.train_steps)
    llm = LoraRetrieverLLM(lm=lm, max_new_tokens=32, chat_template=True)
    routes: list[str] = []

    def traced(step: str):
        """Runs the LLM and records which LoRAs the step was routed to."""

        def call(prompt) -> str:
            result = llm.generate([prompt.to_string()])
            routes.append(f"{step}: {result.generations[0][0].generation_info['routing_str']}")
            return result.generations[0][0].text.strip()

        return RunnableLambda(call)

    translate = PromptTemplate.from_template("Translate to English: {review}") | traced("translate") | StrOutputParser()
    classify = (
        PromptTemplate.from_template(
            "Is the sentiment of this review positive or negative?\n{english}\nOPTIONS:\n- negative\n- positive"
        )
        | traced("classify")
        | StrOutputParser()
    )
    paraphrase = (
        PromptTemplate.from_template(
            'Are these two sentences paraphrases? "{english}" and "The movie was wonderful and the cast was great."'
        )
        | traced("paraphrase")
        | StrOutputParser()
    )
    chain = (
        RunnablePassthrough.assign(english=translate)
        | RunnablePassthrough.assign(sentiment=classify)
        | RunnablePassthrough.assign(same_meaning=paraphrase)
    )
    result = chain.invoke({"review": REVIEW_DE})
    for key in ("english", "sentiment", "same_meaning"):
        print(f"{key}: {result[key]!r}")
    print("\n".join(routes))
    lm.close()


if __name__ == "__main__":
    main()
