"""RAG with task switching: a LangChain RAG chain over a real vector store (LangChain's
InMemoryVectorStore, MiniLM embeddings) stuffs long retrieved context into each prompt. With
``route_on`` every question is routed as the bare question is, not by the context."""

from __future__ import annotations

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.embeddings import Embeddings
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore

from langchain_loraretriever import ChatLoraRetriever, LoraRetrieverLLM
from loraretriever import route_on_variable

TEMPLATE = "Use the context to answer.\n\nContext:\n{context}\n\nQuestion: {question}\nAnswer:"
QUESTIONS = [
    "Is the sentiment of this review positive or negative? The staff were rude and the room was dirty.",
    "Translate to German: Where can I buy a ticket for the museum?",
    "Premise: A child is reading a book in the park. Hypothesis: Someone is outdoors. Entailment or not?",
]
HANDBOOK = [  # what the retriever finds: reference text of none of the pool's tasks
    "The museum opens at nine and closes at six; tickets are sold at the east entrance and online.",
    "Hotel guests can complain at the front desk; the manager answers written complaints within a week.",
    "The city park has a reading corner with benches, a library kiosk and a playground for children.",
    "Tickets for the river cruise include a guided tour of the old harbour and a stop at the museum.",
    "Rooms are cleaned every morning; guests who find a dirty room get a free night after a complaint.",
    "The public library lends books, films and board games; children under twelve borrow for free.",
]


class RoutingSpy(BaseCallbackHandler):
    """Records each generation's adapters."""

    def __init__(self, seen: list) -> None:
        self.seen = seen

    def on_llm_end(self, response, **kwargs) -> None:
        self.seen.extend(g[0].generation_info["routing"]["adapters"] for g in response.generations)


class MiniLM(Embeddings):
    """LangChain embeddings over the test's MiniLM (the edge: no hub download)."""

    def __init__(self, embedder) -> None:
        self.embedder = embedder

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embedder.embed(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


@pytest.fixture(scope="module")
def retriever(minilm):
    store = InMemoryVectorStore(MiniLM(minilm))
    store.add_texts([f"{line} " * 3 for line in HANDBOOK])  # long passages
    return store.as_retriever(search_kwargs={"k": 3})


def join(documents) -> str:
    return "\n\n".join(d.page_content for d in documents)


def adapters(message) -> list[str]:
    return message.response_metadata["routing"]["adapters"]


def test_a_rag_chain_routes_each_question_as_the_bare_question(tools_lm, retriever):
    bare = {q: list(r.adapters) for q, r in zip(QUESTIONS, tools_lm.route(QUESTIONS), strict=True)}
    assert len({tuple(a) for a in bare.values()}) == len(QUESTIONS), "three tasks"
    prompt = PromptTemplate.from_template(TEMPLATE)
    stuffed = [prompt.format(context=join(retriever.invoke(q)), question=q) for q in QUESTIONS]
    assert [list(r.adapters) for r in tools_lm.route(stuffed)] != list(bare.values()), (
        "the stuffed prompts alone route by their context: the case route_on is for"
    )

    llm = LoraRetrieverLLM(lm=tools_lm, max_new_tokens=2)
    routed = llm.bind(route_on=route_on_variable(TEMPLATE, "question"))
    chain = {"context": retriever | join, "question": RunnablePassthrough()} | prompt | routed | StrOutputParser()
    seen = []
    chain.batch(QUESTIONS, config={"callbacks": [RoutingSpy(seen)]})
    assert sorted(seen) == sorted(bare.values())

    chat = ChatLoraRetriever(lm=tools_lm, max_new_tokens=2)  # context in the system message, question last
    chat_prompt = ChatPromptTemplate.from_messages([("system", "Context:\n{context}"), ("human", "{question}")])
    chat_chain = {"context": retriever | join, "question": RunnablePassthrough()} | chat_prompt | chat
    for question, message in zip(QUESTIONS, chat_chain.batch(QUESTIONS), strict=True):
        assert adapters(message) == bare[question]


def test_route_on_errors_name_the_fix(tools_lm):
    with pytest.raises(ValueError, match="'answer' is not a variable of the template; its variables are"):
        route_on_variable(TEMPLATE, "answer")
    with pytest.raises(ValueError, match="was not made from the template"):
        tools_lm.route(["plain text"], route_on=route_on_variable(TEMPLATE, "question"))
    with pytest.raises(ValueError, match="route_on='question' is not 'last_user', 'prompt' or a callable"):
        tools_lm.generate(["hello"], route_on="question")
    whole = tools_lm.route([[{"role": "user", "content": QUESTIONS[0]}]], route_on="prompt")
    assert list(whole[0].adapters) == list(tools_lm.route([QUESTIONS[0]])[0].adapters)
