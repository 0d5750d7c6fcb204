"""LlamaIndex integration of loraretriever: every call routed to its own LoRAs, concurrent calls batched."""

from llamaindex_loraretriever.llms import LoraRetrieverLLM, RoutingLog

__all__ = ["LoraRetrieverLLM", "RoutingLog"]
