"""loraretriever: input-aware LoRA retrieval and composition for mixed-task batches.

The engine behind ``langchain_loraretriever`` and ``llamaindex_loraretriever``:

* :class:`LoraPool` holds PEFT LoRA adapters of one base model, changed at run time;
* :class:`Routing` says which adapters serve a prompt, with which weights and mode;
* :class:`Composer` applies a different routing to every row of one forward pass;
* :class:`Generator` runs batched generation (and streaming) over routed rows;
* :class:`Router` gives every prompt its LoRAs from :class:`AdapterCard` vectors in a Chroma index.
"""

from loraretriever.adapter import AdapterError, LoraAdapter, LoraWeights
from loraretriever.base_model import DEFAULT_MODEL, load_base_model
from loraretriever.cards import AdapterCard, CardStore, RetrievalError
from loraretriever.composer import Composer
from loraretriever.embedder import DEFAULT_EMBEDDER, DEFAULT_INSTRUCTION, Embedder, EmbedderError
from loraretriever.gates import (
    FlowGate,
    FlowGateConfig,
    GateError,
    MeteoraGate,
    MeteoraGateConfig,
    load_gate,
    save_gate,
)
from loraretriever.index import LoraIndex, open_chroma_client
from loraretriever.pool import LoraPool
from loraretriever.retrieval_eval import evaluate_retrieval
from loraretriever.router import RouteOptions, Router
from loraretriever.routing import MODES, Mode, Routing

__all__ = [
    "DEFAULT_EMBEDDER",
    "DEFAULT_INSTRUCTION",
    "DEFAULT_MODEL",
    "MODES",
    "AdapterCard",
    "AdapterError",
    "CardStore",
    "Composer",
    "Embedder",
    "EmbedderError",
    "FlowGate",
    "FlowGateConfig",
    "GateError",
    "LoraAdapter",
    "LoraIndex",
    "LoraPool",
    "LoraWeights",
    "MeteoraGate",
    "MeteoraGateConfig",
    "Mode",
    "RetrievalError",
    "RouteOptions",
    "Router",
    "Routing",
    "evaluate_retrieval",
    "load_base_model",
    "load_gate",
    "open_chroma_client",
    "save_gate",
]
