"""LangChain integration of loraretriever: every call routed to its own LoRAs, batches in one pass."""

from langchain_loraretriever.chat_models import ChatLoraRetriever
from langchain_loraretriever.llms import LoraRetrieverLLM

__all__ = ["ChatLoraRetriever", "LoraRetrieverLLM"]
