"""Where an adapter comes from: a local directory as is, or a Hugging Face hub id fetched (its
adapter files only) into the hub's cache."""

from __future__ import annotations

from pathlib import Path

from loraretriever.pool.adapter import CONFIG_FILE, PICKLE_FILE, SAFETENSORS_FILE, AdapterError

__all__ = ["resolve_source"]


def resolve_source(source: str | Path, *, revision: str | None) -> Path:
    """A local directory as is; otherwise a hub repo id, fetched (adapter files only) into HF's cache."""
    path = Path(source).expanduser()
    if path.exists() or isinstance(source, Path) or str(source).startswith((".", "/", "~")):
        return path
    if str(source).count("/") != 1:
        raise AdapterError(
            f"adapter source {str(source)!r} is neither an existing directory nor a hub id ('org/name')."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                str(source), revision=revision, allow_patterns=[CONFIG_FILE, SAFETENSORS_FILE, PICKLE_FILE]
            )
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        raise AdapterError(
            f"adapter {str(source)!r} is not a local directory and could not be fetched from the Hugging "
            f"Face hub ({type(err).__name__}: {err}). Fix: pass a local path, or check the id and network."
        ) from err
