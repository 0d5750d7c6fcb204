"""loraretriever: input-aware LoRA retrieval and composition for mixed-task batches.

Start here: :class:`RoutedLM` routes and generates (``RoutedLM.from_pretrained(pool_dir=...)``),
:class:`RouteOptions` says how. Below it (see docs/ARCHITECTURE.md):

* :class:`LoraPool` holds PEFT LoRA adapters of one base model, changed at run time;
* :class:`Routing` says which adapters serve a prompt, with which weights and mode;
* :class:`Composer` applies a different routing to every row of one forward pass;
* :class:`Engine` serves requests with continuous batching (:class:`EngineConfig` for its limits),
  :class:`Generator` steps it inline for a list of prompts (and streams);
* :class:`Router` gives every prompt its LoRAs from :class:`AdapterCard` vectors in a Chroma index.
"""

__version__ = "0.1.0"  # the one version source: pyproject.toml reads it

from loraretriever.engine.base_model import DEFAULT_MODEL, load_base_model
from loraretriever.engine.composer import Composer
from loraretriever.engine.engine import Engine, EngineConfig
from loraretriever.engine.gates import (
    FlowGate,
    FlowGateConfig,
    GateError,
    MeteoraGate,
    MeteoraGateConfig,
    load_gate,
    save_gate,
)
from loraretriever.engine.generation import Generator
from loraretriever.engine.requests import Completion, GenerationConfig, RequestError
from loraretriever.engine.routing import MODES, Mode, Routing
from loraretriever.pool.adapter import AdapterError, LoraAdapter, LoraWeights
from loraretriever.pool.lora_pool import LoraPool
from loraretriever.retrieval.cards import AdapterCard, CardStore, RetrievalError
from loraretriever.retrieval.embedder import DEFAULT_EMBEDDER, DEFAULT_INSTRUCTION, Embedder, EmbedderError
from loraretriever.retrieval.index import LoraIndex, open_chroma_client
from loraretriever.retrieval.options import RouteOptions
from loraretriever.retrieval.router import Router
from loraretriever.serving.calls import route_on_variable
from loraretriever.serving.routed_lm import Result, RoutedLM

__all__ = [
    "DEFAULT_EMBEDDER",
    "DEFAULT_INSTRUCTION",
    "DEFAULT_MODEL",
    "MODES",
    "AdapterCard",
    "AdapterError",
    "CardStore",
    "Completion",
    "Composer",
    "Embedder",
    "EmbedderError",
    "Engine",
    "EngineConfig",
    "FlowGate",
    "FlowGateConfig",
    "GateError",
    "GenerationConfig",
    "Generator",
    "LoraAdapter",
    "LoraIndex",
    "LoraPool",
    "LoraWeights",
    "MeteoraGate",
    "MeteoraGateConfig",
    "Mode",
    "RequestError",
    "Result",
    "RetrievalError",
    "RouteOptions",
    "RoutedLM",
    "Router",
    "Routing",
    "__version__",
    "load_base_model",
    "load_gate",
    "open_chroma_client",
    "route_on_variable",
    "save_gate",
]
