"""Where loraretriever keeps what it builds once (converted models, default pools, indexes)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["HOME_ENV", "loraretriever_home"]

HOME_ENV = "LORARETRIEVER_HOME"


def loraretriever_home() -> Path:
    """The cache root: ``$LORARETRIEVER_HOME`` if set, else ``~/.cache/loraretriever``.

    Example:
        >>> import os; os.environ["LORARETRIEVER_HOME"] = "/tmp/lr"
        >>> str(loraretriever_home())
        '/tmp/lr'
    """
    root = os.environ.get(HOME_ENV)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "loraretriever"
    path.mkdir(parents=True, exist_ok=True)
    return path
