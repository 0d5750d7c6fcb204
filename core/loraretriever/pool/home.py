"""Where loraretriever keeps what it builds once (converted models, default pools, indexes), and
the permissions of what it writes."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["HOME_ENV", "loraretriever_home", "with_umask"]

HOME_ENV = "LORARETRIEVER_HOME"

# read once at import: os.umask can only be read by setting it, which is not thread-safe later
_UMASK = os.umask(0)
os.umask(_UMASK)


def with_umask(path: str | Path) -> None:
    """Gives a file or directory the mode a plain ``open`` / ``mkdir`` would have (0644 / 0755
    under the usual umask): ``tempfile.mkstemp`` / ``mkdtemp`` make them private, but pool files
    are meant to be read by the user's other processes and accounts as any file they write."""
    path = Path(path)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~_UMASK)


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
