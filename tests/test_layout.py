"""The folder map of DESIGN.md, checked: who may import whom, and who may read the environment."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["dcmflow", "deployments", "flows", "tasks", "services_registry", "storage", "receiver"]

# DESIGN.md: dcmflow → flows → tasks → services_registry, storage; receiver → storage;
# deployments/ is a loader only: it names flows by module path and imports none of ours.
ALLOWED = {
    "deployments": set(),
    "storage": set(),
    "services_registry": {"storage"},
    "receiver": {"storage"},
    "tasks": {"services_registry", "storage"},
    "flows": {"tasks", "services_registry", "storage"},
    "dcmflow": {"deployments", "flows", "tasks", "services_registry", "storage", "receiver"},
}
PREFECT_ALLOWED = {"flows", "tasks", "dcmflow", "deployments"}  # plus receiver's event emitter, see below


def _modules(package: str) -> list[Path]:
    return [p for p in (ROOT / package).rglob("*.py") if "examples" not in p.parts]


def _imported_tops(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    tops: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            tops.add(node.module.split(".")[0])
    return tops


# The one exception: a flow body is an entry point and builds Settings (DESIGN.md), so
# flows/_settings.py may import the leaf module dcmflow.settings, and nothing else of dcmflow.
EXCEPTIONS = {(ROOT / "flows" / "_settings.py", "dcmflow.settings")}


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_point_one_way(package: str) -> None:
    offenders = []
    for path in _modules(package):
        for module in _imported_modules(path):
            top = module.split(".")[0]
            if top in ALLOWED and top != package and top not in ALLOWED[package]:
                if (path, module) not in EXCEPTIONS:
                    offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offenders, offenders


def test_no_import_by_name_to_dodge_the_map() -> None:
    """importlib.import_module("dcmflow...") would hide an edge from the check above."""
    offenders = []
    for package in PACKAGES:
        for path in _modules(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "import_module"
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                    and node.args[0].value.split(".")[0] in ALLOWED
                ):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.args[0].value}")
    assert not offenders, offenders


@pytest.mark.parametrize("package", PACKAGES)
def test_prefect_is_imported_only_where_allowed(package: str) -> None:
    offenders = []
    for path in _modules(package):
        if "prefect" not in _imported_tops(path):
            continue
        if package in PREFECT_ALLOWED or (package == "receiver" and path.name == "events.py"):
            continue
        offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


def test_only_settings_reads_the_environment() -> None:
    """Settings are built at entry points and passed on (STYLE.md §5)."""
    offenders = []
    for package in PACKAGES:
        for path in _modules(package):
            if path == ROOT / "dcmflow" / "settings.py":
                continue
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                # os.getenv(...) / os.environ[...] / os.environ.get(...); building a child
                # process environment from os.environ.copy() is allowed.
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    f = node.func
                    if isinstance(f.value, ast.Name) and f.value.id == "os" and f.attr == "getenv":
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                    if (
                        isinstance(f.value, ast.Attribute)
                        and f.value.attr == "environ"
                        and f.attr in {"get", "setdefault", "pop"}
                    ):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute):
                    if node.value.attr == "environ" and isinstance(node.ctx, ast.Load):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders
