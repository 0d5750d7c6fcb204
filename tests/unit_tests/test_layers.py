"""The package's layers: a module imports only from its own layer and the layers below it.

errors < pool < engine < retrieval < serving < training, evaluation < cli. Imports inside functions count too (a
lazy import is still a dependency). The top-level facade and the integrations stand on serving.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "core" / "loraretriever"

# What each layer may import from loraretriever (besides itself).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),  # the library's error types, which every layer raises
    "pool": {"errors"},  # adapter files, the registry and its tiers, the pool directory
    "engine": {"errors", "pool"},
    "retrieval": {"errors", "pool", "engine"},
    "serving": {"errors", "pool", "engine", "retrieval"},
    "server": {"errors", "pool", "engine", "retrieval", "serving"},  # the HTTP layer over RoutedLM
    "training": {"errors", "pool", "engine", "retrieval", "serving"},
    "evaluation": {
        "errors",
        "pool",
        "engine",
        "retrieval",
        "serving",
        "server",
        "integration",
    },  # benchmarks measure these
    "cli": {
        "errors",
        "pool",
        "engine",
        "retrieval",
        "serving",
        "server",
        "training",
        "evaluation",
        "integration",
        "facade",
    },
    "facade": {"errors", "pool", "engine", "retrieval", "serving"},
    "integration": {"errors", "facade", "pool", "engine", "retrieval", "serving"},
}
INTEGRATIONS = ("langchain_loraretriever", "llamaindex_loraretriever")


def imported_modules(path: Path) -> set[str]:
    """Every absolute module an ``import`` or ``from ... import`` in the file names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}: relative import; use absolute `loraretriever.` imports.")
            names.add(node.module or "")
    return names


def layer_of(module: str) -> str | None:
    """``engine`` for ``loraretriever.pool.lora_pool``, ``facade`` for ``loraretriever``, None if not ours."""
    parts = module.split(".")
    if parts[0] in INTEGRATIONS:
        return "integration"
    if parts[0] != "loraretriever":
        return None
    return parts[1] if len(parts) > 1 else "facade"


def violations(path: Path, layer: str, root: Path = ROOT) -> list[str]:
    allowed = ALLOWED[layer] | {layer}
    found = []
    for module in sorted(imported_modules(path)):
        target = layer_of(module)
        if target is not None and target not in allowed:
            found.append(f"{path.relative_to(root)} ({layer}) imports {module} ({target})")
    return found


def package_files() -> list[tuple[Path, str]]:
    files = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).parts
        files.append((path, "facade" if len(relative) == 1 else relative[0]))
    for name in INTEGRATIONS:
        files += [(path, "integration") for path in sorted((ROOT / name).rglob("*.py"))]
    return files


def test_every_package_module_belongs_to_a_known_layer():
    layers = {layer for _, layer in package_files()}
    assert layers <= set(ALLOWED), layers - set(ALLOWED)
    assert {"pool", "engine", "retrieval", "serving", "training", "evaluation", "cli"} <= layers
    # No loose modules beside the facade: every module lives in a layer.
    assert [p.name for p, layer in package_files() if layer == "facade"] == ["__init__.py"]


@pytest.mark.parametrize("layer", list(ALLOWED))
def test_layer_imports_only_from_below(layer):
    found = [v for path, lay in package_files() if lay == layer for v in violations(path, lay)]
    assert found == [], "\n".join(found)


def test_the_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "pool.py"
    bad.write_text("def f():\n    from loraretriever.serving.routed_lm import RoutedLM\n")
    assert violations(bad, "engine", tmp_path) == ["pool.py (engine) imports loraretriever.serving.routed_lm (serving)"]
    bad.write_text("from loraretriever.evaluation import tasks\n")
    assert violations(bad, "integration", tmp_path) == [
        "pool.py (integration) imports loraretriever.evaluation (evaluation)"
    ]


# The one engine module the integrations may name: it turns a missing optional package into the
# error naming the extra to install, and every layer's optional imports share it.
INTEGRATION_ENGINE_EXCEPTIONS = {"loraretriever.engine.extras"}


def engine_imports(path: Path) -> list[str]:
    """What a file imports from ``loraretriever.engine``, each as ``module.name``
    (``from loraretriever import engine`` counts too), less the exceptions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return sorted(
        name
        for name in found
        if (name == "loraretriever.engine" or name.startswith("loraretriever.engine."))
        and not any(name == e or name.startswith(e + ".") for e in INTEGRATION_ENGINE_EXCEPTIONS)
    )


def test_the_integrations_enter_through_serving_not_the_engine():
    """LangChain and LlamaIndex reach the library through ``loraretriever.serving`` (and the
    facade): what they need of the engine (``prompt_text``, ...) is re-exported there, so the
    engine's modules can change without breaking them."""
    found = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path, layer in package_files()
        if layer == "integration"
        for module in engine_imports(path)
    ]
    assert found == [], "\n".join(found)
