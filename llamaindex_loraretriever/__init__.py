"""LlamaIndex integration of loraretriever: every call routed to its own LoRAs, concurrent calls batched.

Needs the ``llamaindex`` extra: ``pip install 'loraretriever[llamaindex]'``.
"""

from loraretriever.engine.extras import extra_error

try:
    from llamaindex_loraretriever.llms import LoraRetrieverLLM, RoutingLog
except ModuleNotFoundError as error:
    raise extra_error(error) from error

__all__ = ["LoraRetrieverLLM", "RoutingLog"]
