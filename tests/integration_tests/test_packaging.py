"""The package as pip installs it: the wheel built from a copy of the source tree (nothing is
written into the repository) holds every module, declares every import, and runs from the wheel.

The full path (a fresh venv, `pip install loraretriever[all]`, `loraretriever setup`, a route, a
LangChain call, a server) runs in CI after `make test`: `.ci/install-check`.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from loraretriever.engine.extras import EXTRA_OF
from tests.conftest import ROOT

PACKAGES = ("loraretriever", "langchain_loraretriever", "llamaindex_loraretriever")
SOURCES = {"loraretriever": ROOT / "core" / "loraretriever"} | {name: ROOT / name for name in PACKAGES[1:]}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built the way pip builds it, from a copy of the tree (setuptools writes build/
    and egg-info next to its input)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for path in (*SOURCES.values(), ROOT / "pyproject.toml", ROOT / "README.md"):
        target = source / path.relative_to(ROOT)
        if path.is_dir():
            shutil.copytree(path, target, ignore=ignore)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", work / "dist", source],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (found,) = (work / "dist").glob("loraretriever-*.whl")
    return found


def wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def wheel_metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return Parser().parsestr(archive.read(name).decode())


def declared(wheel: Path) -> tuple[set[str], dict[str, set[str]]]:
    """The core requirements and each extra's, as canonical distribution names; an extra that
    names ``loraretriever[...]`` gets those extras' requirements too."""
    core: set[str] = set()
    own: dict[str, set[str]] = {}
    nested: dict[str, set[str]] = {}
    metadata = wheel_metadata(wheel)
    for extra in metadata.get_all("Provides-Extra") or []:
        own[extra], nested[extra] = set(), set()
        for line in metadata.get_all("Requires-Dist") or []:
            requirement = Requirement(line)
            if requirement.marker is None or not requirement.marker.evaluate({"extra": extra}):
                continue
            if canonicalize_name(requirement.name) == "loraretriever":
                nested[extra] |= requirement.extras
            else:
                own[extra].add(canonicalize_name(requirement.name))
    for line in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            core.add(canonicalize_name(requirement.name))

    def closure(extra: str, seen: frozenset[str] = frozenset()) -> set[str]:
        names = set(own[extra])
        for inner in nested[extra] - seen:
            names |= closure(inner, seen | {extra})
        return names

    return core, {extra: closure(extra) for extra in own}


def third_party_imports(source: str, filename: str) -> set[str]:
    """The top-level names of every import (lazy ones too) that is neither stdlib nor ours."""
    names = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "import_optional":
            names.add(node.args[0].value.split(".")[0])  # import_optional("llguidance.hf")
    return names - set(sys.stdlib_module_names) - {"__future__", *PACKAGES}


def test_the_wheel_holds_every_module_of_the_source_tree_and_nothing_else(wheel):
    files = wheel_files(wheel)
    expected = {
        f"{name}/{path.relative_to(source).as_posix()}"
        for name, source in SOURCES.items()
        for path in source.rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert expected, "no source modules found"
    assert expected - files == set(), "modules missing from the wheel"
    assert {f"{name}/py.typed" for name in PACKAGES} <= files
    # Only the three packages and the metadata: no pools, data, results, tests or examples.
    import loraretriever

    metadata = wheel_metadata(wheel)
    assert metadata["Version"] == loraretriever.__version__
    assert {name.split("/")[0] for name in files} - set(PACKAGES) == {f"loraretriever-{metadata['Version']}.dist-info"}


def test_every_third_party_import_is_declared_in_the_core_or_its_extra(wheel):
    core, extras = declared(wheel)
    distributions = {
        name: {canonicalize_name(d) for d in dists}
        for name, dists in importlib.metadata.packages_distributions().items()
    }
    problems = []
    with zipfile.ZipFile(wheel) as archive:
        for member in sorted(n for n in archive.namelist() if n.endswith(".py")):
            for name in sorted(third_party_imports(archive.read(member).decode(), member)):
                providers = distributions.get(name)
                if not providers:
                    problems.append(f"{member}: imports {name!r}, which no installed distribution provides")
                elif name in EXTRA_OF:
                    if not providers & extras.get(EXTRA_OF[name], set()):
                        problems.append(f"{member}: {name!r} ({providers}) is not in the extra {EXTRA_OF[name]!r}")
                elif not providers & core:
                    problems.append(f"{member}: {name!r} ({providers}) is neither a core requirement nor in EXTRA_OF")
    assert problems == []
    # `all` is every extra a user runs; the test tools stay out of it.
    assert set(extras) >= {"langchain", "llamaindex", "serve", "agents", "ray", "train", "eval", "models", "test"}
    users = set().union(*(extras[e] for e in extras if e not in {"all", "test"}))
    assert extras["all"] == users and not extras["all"] & {"pytest", "ruff", "hypothesis"}


def test_every_optional_import_names_an_extra_that_declares_its_package(wheel):
    _, extras = declared(wheel)
    distributions = importlib.metadata.packages_distributions()
    for name, extra in EXTRA_OF.items():
        assert {canonicalize_name(d) for d in distributions[name]} & extras[extra], (name, extra)


def install_without_deps(wheel: Path, tmp_path: Path) -> Path:
    target = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, wheel],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return target


# Runs in a subprocess: every module of the three packages imports (from the wheel's copy), then
# the --help of every command and sub-command of the CLI.
_IMPORT_AND_HELP = textwrap.dedent(
    """
    import argparse, contextlib, importlib, io, json, pkgutil, sys
    import loraretriever, langchain_loraretriever, llamaindex_loraretriever
    from loraretriever.cli import build_parser, main

    target = sys.argv[1]
    modules = []
    for package in (loraretriever, langchain_loraretriever, llamaindex_loraretriever):
        modules.append(package)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            modules.append(importlib.import_module(info.name))

    def commands(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield path + [name]
                    yield from commands(sub, path + [name])

    helped = {}
    for command in commands(build_parser(), []):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main(command + ["--help"])
                code = None
            except SystemExit as done:
                code = done.code
        helped[" ".join(command)] = [code, out.getvalue()[:60]]
    # every module of ours that ran came from the wheel (the editable install's finder would serve
    # one the wheel lacks from the source tree)
    ours = [m for name, m in sys.modules.items() if name.split(".")[0] in ("loraretriever", "langchain_loraretriever", "llamaindex_loraretriever")]
    outside = sorted(m.__name__ for m in ours if not (getattr(m, "__file__", None) or target).startswith(target))
    print(json.dumps({"modules": len(modules), "outside": outside, "helped": helped}))
    """
)


def test_the_wheel_installed_over_this_environment_imports_every_module_and_runs_every_help(wheel, tmp_path):
    import json

    target = install_without_deps(wheel, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_AND_HELP, str(target)],
        cwd=tmp_path,  # not the repository: its packages must not shadow the wheel's
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["outside"] == []
    assert report["modules"] >= len([n for n in wheel_files(wheel) if n.endswith(".py")])
    assert {"setup", "route", "serve", "pool", "pool add", "bench", "bench serve"} <= set(report["helped"])
    failed = {command: code for command, (code, _) in report["helped"].items() if code != 0}
    assert failed == {}
    assert all(text.startswith("usage: loraretriever") for _, text in report["helped"].values())
    # The console script pip wrote runs the wheel's CLI.
    script = subprocess.run(
        [target / "bin" / "loraretriever", "--version"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert script.returncode == 0 and script.stdout.split() == ["loraretriever", wheel_metadata(wheel)["Version"]]


def core_closure(core: set[str]) -> set[str]:
    """The distributions a base install brings: the core requirements and, recursively, theirs
    (markers evaluated here, no extras)."""
    environment = {**default_environment(), "extra": ""}
    seen: set[str] = set()
    todo = list(core)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                todo.append(canonicalize_name(requirement.name))
    return seen


# A base install, imitated in this environment: importing an optional package that the core's
# dependencies do not bring fails, as it would there.
_BASE_INSTALL = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from importlib.abc import MetaPathFinder

    BLOCKED = set(json.loads(sys.argv[1]))
    POOL = sys.argv[2]

    class Absent(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Absent())
    import loraretriever
    from loraretriever.cli import main

    report = {"help": {}}
    for command in (["--help"], ["setup", "--help"], ["route", "--help"], ["serve", "--help"], ["pool", "--help"]):
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main(command)
            except SystemExit as done:
                report["help"][" ".join(command)] = done.code
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        report["serve"] = main(["serve", "--pool", POOL, "--port", "1"])
    report["serve_error"] = err.getvalue()
    try:
        import langchain_loraretriever
    except ModuleNotFoundError as error:
        report["langchain"] = str(error)
    try:
        from loraretriever.engine.constraints import json_schema_grammar
        json_schema_grammar({"type": "string"})
    except ModuleNotFoundError as error:
        report["grammar"] = str(error)
    print(json.dumps(report))
    """
)


def test_a_base_install_imports_and_each_command_without_its_extra_names_it(wheel, tmp_path):
    import json

    core, _ = declared(wheel)
    brought = core_closure(core)
    providers = importlib.metadata.packages_distributions()
    blocked = sorted(name for name in EXTRA_OF if not {canonicalize_name(d) for d in providers[name]} & brought)
    # The imitation is only worth something if it takes away the features' own packages.
    assert {"fastapi", "langchain_core", "llguidance", "ray"} <= set(blocked), blocked
    target = install_without_deps(wheel, tmp_path)
    pool = tmp_path / "pool"
    pool.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", _BASE_INSTALL, json.dumps(blocked), str(pool)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report["help"].values()) == {0}
    assert report["serve"] == 2
    assert report["serve_error"].startswith("error: loraretriever serve needs the optional package")
    assert "pip install 'loraretriever[serve]'" in report["serve_error"]
    assert "pip install 'loraretriever[langchain]'" in report["langchain"]
    assert "pip install 'loraretriever[agents]'" in report["grammar"]


def test_editable_install_maps_core_loraretriever_to_the_package():
    import loraretriever

    assert Path(loraretriever.__file__).resolve().parent == ROOT / "core" / "loraretriever"
