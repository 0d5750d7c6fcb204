"""LangChain integration of loraretriever: every call routed to its own LoRAs, batches in one pass.

Needs the ``langchain`` extra: ``pip install 'loraretriever[langchain]'``.
"""

from loraretriever.engine.extras import extra_error

try:
    from langchain_loraretriever.chat_models import ChatLoraRetriever
    from langchain_loraretriever.llms import LoraRetrieverLLM
except ModuleNotFoundError as error:
    raise extra_error(error) from error

__all__ = ["ChatLoraRetriever", "LoraRetrieverLLM"]
