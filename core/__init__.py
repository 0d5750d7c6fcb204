"""loraretriever: input-aware LoRA retrieval and composition for mixed-task batches.

The engine behind ``langchain_loraretriever`` and ``llamaindex_loraretriever``:

* :class:`LoraPool` holds PEFT LoRA adapters of one base model, changed at run time;
* :class:`Routing` says which adapters serve a prompt, with which weights and mode;
* :class:`Composer` applies a different routing to every row of one forward pass;
* :class:`Generator` runs batched generation (and streaming) over routed rows.
"""

from loraretriever.adapter import AdapterError, LoraAdapter, LoraWeights
from loraretriever.base_model import DEFAULT_MODEL, load_base_model
from loraretriever.composer import Composer
from loraretriever.pool import LoraPool
from loraretriever.routing import MODES, Mode, Routing

__all__ = [
    "DEFAULT_MODEL",
    "MODES",
    "AdapterError",
    "Composer",
    "LoraAdapter",
    "LoraPool",
    "LoraWeights",
    "Mode",
    "Routing",
    "load_base_model",
]
