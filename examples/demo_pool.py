"""The examples' shared helpers: where the demo pool and the task data are, and the model opened on them.

The demo pool is committed: ``pools/bigbench`` holds 28 BIG-bench task LoRAs of the default base
model (trained by ``loraretriever train-pool`` on the splits in ``data/bigbench``) with their cards,
so nothing is trained on a user's machine. Its Chroma index is built from the cards on first open
(``POOL_DIR/index``, a few seconds) and reused after.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = [
    "DEMO_POOL_ENV",
    "DEMO_ROUTING",
    "demo_parser",
    "find_bigbench_splits",
    "find_demo_pool",
    "open_demo_lm",
]

# Retrieval weights for the demo pool, chosen on its train split (see README, mixed-task benchmark).
DEMO_ROUTING: dict[str, object] = {"weighting": "softmax", "routing_temperature": 0.02}
DEMO_POOL_ENV = "LORARETRIEVER_DEMO_POOL"
BIGBENCH_SPLITS_ENV = "LORARETRIEVER_BIGBENCH_SPLITS"
# The checkout's root: the examples live in it.
_CHECKOUT = Path(__file__).resolve().parents[1]


def _find(env: str, relative: str, marker: str, what: str, start: str | Path | None) -> Path:
    """``$env``, else ``relative`` under the checkout, the start directory or one of its parents."""
    if os.environ.get(env):
        path = Path(os.environ[env]).expanduser()
    else:
        here = Path(start or Path.cwd()).resolve()
        candidates = [p / relative for p in (_CHECKOUT, here, *here.parents)]
        path = next((c for c in candidates if (c / marker).exists()), candidates[0])
    if not (path / marker).exists():
        raise FileNotFoundError(f"{what} is not at {str(path)!r}. Fix: set {env} to the directory holding {marker}.")
    return path


def find_demo_pool(start: str | Path | None = None) -> Path:
    """The committed demo pool: ``$LORARETRIEVER_DEMO_POOL``, else ``pools/bigbench`` of the checkout."""
    return _find(DEMO_POOL_ENV, "pools/bigbench", "adapters", "the demo pool", start)


def find_bigbench_splits(start: str | Path | None = None) -> Path:
    """The committed BIG-bench splits: ``$LORARETRIEVER_BIGBENCH_SPLITS``, else ``data/bigbench``."""
    return _find(BIGBENCH_SPLITS_ENV, "data/bigbench", "README.md", "the BIG-bench task splits", start)


def open_demo_lm(pool_dir: str | Path | None = None, **lm_kwargs):
    """The default base model with the demo pool and a router over its cards, routing with
    :data:`DEMO_ROUTING` unless ``route_defaults`` says otherwise.

    Args:
        pool_dir: A pool directory; default :func:`find_demo_pool`.
        **lm_kwargs: Passed to :meth:`~loraretriever.serving.routed_lm.RoutedLM.from_model`.

    Example:
        >>> lm = open_demo_lm()  # doctest: +SKIP
        >>> lm.route(["The word aebtde is a scrambled version of the English word"])[0].adapters[0]  # doctest: +SKIP
        'word_unscrambling'
    """
    from loraretriever.engine.base_model import load_base_model
    from loraretriever.serving.routed_lm import RoutedLM

    model, tokenizer = load_base_model()
    lm_kwargs.setdefault("route_defaults", DEMO_ROUTING)
    return RoutedLM.from_model(model, tokenizer, pool_dir=Path(pool_dir) if pool_dir else find_demo_pool(), **lm_kwargs)


def demo_parser(description: str | None) -> argparse.ArgumentParser:
    """The command line the examples share: which pool directory to open."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--pool-dir", default=None, help="Pool directory (default: the committed pools/bigbench).")
    return parser
