"""Import a service's code under a private module namespace, so services never mix.

Why
---
In a dcm-processor service the callback package (in ``registry/``) and the worker package
(in ``module/``) usually have the *same* top-level name, and two services may use the same
name too. The seed avoided clashes only because callbacks and workers ran in different
containers; its scheduler cached every registry module in ``sys.modules`` for ever
(reference §1.2, §6.2). dcmflow evaluates callbacks of all services in one process, so each
service side gets an :class:`IsolatedImporter`:

* its top-level packages are loaded from their files with
  :func:`importlib.util.spec_from_file_location` under a mangled name
  ``_dcmflow_svc_<service>_<n>.<side>.<pkg>`` with ``submodule_search_locations``, so
  relative imports resolve to that service's own files;
* while the service's code runs (import, or a callback call) :meth:`IsolatedImporter.active`
  aliases the *plain* names (``pkg``, ``pkg.sub``) to those modules, so absolute
  intra-package imports resolve to the same files and the same module objects; on exit every
  plain-name entry is removed and whatever was there before is put back. No plain name of a
  service is ever left in :data:`sys.modules` for another service to pick up.

Name resolution inside one side (``registry/`` or ``module/``) follows the seed: the side's
folder *itself* is the package named after the install name (``cp -r registry
$REGISTRY/<name>``), and packages or modules inside the folder are top-level names too
(as if the folder were on ``sys.path``). Third-party imports go through ``sys.path`` as usual.

Workers are never imported here: they run in their own process later. :func:`find_attribute`
checks that a worker's dotted name resolves by reading the files (``ast``), so a worker
whose dependencies are not installed in this interpreter can still be validated.

The aliasing touches the process-global ``sys.modules``; a lock serialises it, and callers run
one service's code at a time. Other threads (Prefect's) keep importing meanwhile, so every walk
over ``sys.modules`` goes over a :func:`_modules` snapshot, never the live dict.
"""

from __future__ import annotations

import ast
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import itertools
import re
import sys
import threading
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["IsolatedImporter", "top_level_names", "find_attribute", "plain_module_name", "strip_mangled"]

_PREFIX = "_dcmflow_svc_"
_RE_MANGLED = re.compile(rf"^{_PREFIX}[A-Za-z0-9_]*\.(?:registry|module|python)\.")
_RE_MANGLED_ANYWHERE = re.compile(rf"{_PREFIX}[A-Za-z0-9_]*\.(?:registry|module|python)\.")
_counter = itertools.count(1)
_lock = threading.RLock()


def plain_module_name(name: str) -> str:
    """The name a module has in its own service (``pkg.sub``), mangled prefix removed."""
    return _RE_MANGLED.sub("", name, count=1)


def strip_mangled(text: str) -> str:
    """``text`` (an error message) with every private prefix removed, as the author wrote names."""
    return _RE_MANGLED_ANYWHERE.sub("", text)


def _is_package_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith((".", "__")) and (
        (path / "__init__.py").is_file() or any(path.glob("*.py"))
    )


def top_level_names(folder: Path, alias: str | None = None) -> dict[str, Path]:
    """Top-level importable names of one side of a service, mapped to their files.

    Parameters
    ----------
    folder
        ``registry/`` or ``module/`` of a service folder, or a Python module's import root.
    alias
        The install name: the folder itself is importable under it (seed layout, where
        ``registry/__init__.py`` *is* package ``<name>``). A package ``folder/<alias>/`` wins
        when ``folder`` has no ``__init__.py`` of its own.

    Returns
    -------
    dict
        ``{name: package dir or module .py file}``.
    """
    tops: dict[str, Path] = {}
    if folder.is_dir():
        for child in sorted(folder.iterdir()):
            if _is_package_dir(child):
                tops[child.name] = child
            elif child.is_file() and child.suffix == ".py" and child.stem != "__init__":
                tops[child.stem] = child
    if alias and (alias not in tops or (folder / "__init__.py").is_file()):
        tops[alias] = folder
    return tops


class _AliasLoader(importlib.abc.Loader):
    """Hands back an already imported (mangled) module for a plain name."""

    def __init__(self, module: types.ModuleType) -> None:
        self._module = module
        self._spec = getattr(module, "__spec__", None)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self._module

    def exec_module(self, module: types.ModuleType) -> None:
        # module_from_spec() always overwrites __spec__ with the alias spec; put the real one
        # back so relative imports and tracebacks keep naming the private module.
        module.__spec__ = self._spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Resolves ``pkg`` / ``pkg.sub`` of the active service to its mangled modules."""

    def __init__(self, importer: IsolatedImporter) -> None:
        self._importer = importer

    def find_spec(
        self, fullname: str, path: Any = None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".", 1)[0] not in self._importer.tops:
            return None
        module = self._importer.import_module(fullname)
        return importlib.machinery.ModuleSpec(
            fullname, _AliasLoader(module), is_package=hasattr(module, "__path__")
        )


def _modules() -> dict[str, types.ModuleType]:
    """A snapshot of :data:`sys.modules`: ``dict.copy`` runs in C under the GIL, so another thread's
    import cannot change the dict half-way through it, as it can during a Python-level loop."""
    return sys.modules.copy()


class IsolatedImporter:
    """Imports one side of one service under a private, unique module namespace.

    Parameters
    ----------
    service
        Service name (only used to make the namespace readable in tracebacks).
    side
        ``"registry"``, ``"module"`` or ``"python"``.
    tops
        Top-level names and their files, from :func:`top_level_names`.
    """

    def __init__(self, service: str, side: str, tops: Mapping[str, Path]) -> None:
        safe = re.sub(r"[^A-Za-z0-9_]", "_", service)
        self.tops = dict(tops)
        self.root_name = f"{_PREFIX}{safe}_{next(_counter)}"
        self.prefix = f"{self.root_name}.{side}"
        for name in (self.root_name, self.prefix):
            if name not in sys.modules:
                holder = types.ModuleType(name)
                holder.__path__ = []
                sys.modules[name] = holder

    def mangled(self, name: str) -> str:
        """The private name of plain module ``name``."""
        return f"{self.prefix}.{name}"

    def _load_top(self, top: str) -> types.ModuleType:
        mangled = self.mangled(top)
        if mangled in sys.modules:
            return sys.modules[mangled]
        path = self.tops[top]
        if path.is_dir():
            init = path / "__init__.py"
            if init.is_file():
                spec = importlib.util.spec_from_file_location(
                    mangled, init, submodule_search_locations=[str(path)]
                )
            else:  # a namespace package (no __init__.py), as Python 3 allows
                spec = importlib.machinery.ModuleSpec(mangled, None, is_package=True)
                spec.submodule_search_locations = [str(path)]
        else:
            spec = importlib.util.spec_from_file_location(mangled, path)
        if spec is None:
            raise ModuleNotFoundError(f"cannot load {top!r} from {path}", name=top)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mangled] = module
        try:
            if spec.loader is not None:
                spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(mangled, None)
            raise
        return module

    def import_module(self, name: str) -> types.ModuleType:
        """Import plain dotted ``name`` of this service (inside :meth:`active`).

        Raises
        ------
        ModuleNotFoundError
            When the top-level name is not one of this service's.
        """
        top = name.split(".", 1)[0]
        if top not in self.tops:
            raise ModuleNotFoundError(f"No module named {top!r} in this service", name=top)
        module = self._load_top(top)
        if name != top:
            module = importlib.import_module(self.mangled(name))
        return module

    @contextmanager
    def active(self) -> Iterator[None]:
        """Plain names of this service resolve to its own files, and only inside this block."""
        with _lock:
            def owned(key: str) -> bool:
                return key.split(".", 1)[0] in self.tops

            saved = {k: v for k, v in _modules().items() if owned(k)}
            for key in saved:
                del sys.modules[key]
            for key, module in _modules().items():
                if key.startswith(self.prefix + "."):
                    sys.modules[key[len(self.prefix) + 1 :]] = module
            finder = _AliasFinder(self)
            sys.meta_path.insert(0, finder)
            try:
                yield
            finally:
                sys.meta_path.remove(finder)
                for key in [k for k in _modules() if owned(k)]:
                    sys.modules.pop(key, None)
                sys.modules.update(saved)

    def resolve(self, dotted: str) -> Callable[..., Any]:
        """The object named ``package.module.function``, as the seed's scheduler finds it.

        ``rsplit(".", 1)``, import the module, ``getattr`` the function (reference §1.2).

        Raises
        ------
        ImportError, AttributeError
            When it does not resolve; callers turn this into a one-line validation error.
        """
        module_name, attribute = dotted.rsplit(".", 1)
        with self.active():
            module = self.import_module(module_name)
        if not hasattr(module, attribute):
            raise AttributeError(f"module {module_name!r} has no attribute {attribute!r}")
        target = getattr(module, attribute)
        if not callable(target):
            raise TypeError(f"{dotted!r} is not callable")
        return target  # type: ignore[no-any-return]

    def close(self) -> None:
        """Forget every module imported by this importer."""
        for key in [k for k in _modules() if k == self.root_name or k.startswith(self.root_name + ".")]:
            sys.modules.pop(key, None)


def _bound_names(tree: ast.Module) -> tuple[set[str], bool]:
    """Names bound at module level, and whether a ``from x import *`` makes that unknowable."""
    names: set[str] = set()
    star = False

    def visit(body: list[ast.stmt]) -> None:
        nonlocal star
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for sub in ast.walk(target):
                        if isinstance(sub, ast.Name):
                            names.add(sub.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    if alias.name == "*":
                        star = True
                    else:
                        names.add(alias.asname or alias.name.split(".", 1)[0])
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                for attr in ("body", "orelse", "finalbody"):
                    visit(getattr(node, attr, []) or [])
                for handler in getattr(node, "handlers", []) or []:
                    visit(handler.body)

    visit(tree.body)
    return names, star


def find_attribute(dotted: str, tops: Mapping[str, Path]) -> str | None:
    """Check, without importing, that ``package.module.function`` resolves in ``tops``.

    Parameters
    ----------
    dotted
        A worker's dotted name.
    tops
        The worker side's top-level names (:func:`top_level_names` of ``module/``).

    Returns
    -------
    str or None
        ``None`` when it resolves, else the reason in a few words.
    """
    parts = dotted.split(".")
    module_parts, attribute = parts[:-1], parts[-1]
    if module_parts[0] not in tops:
        return f"no package {module_parts[0]!r} (found: {', '.join(sorted(tops)) or 'none'})"
    current = tops[module_parts[0]]
    for part in module_parts[1:]:
        if not current.is_dir():
            return f"{'.'.join(module_parts)!r}: {current.name} is a module, not a package"
        if _is_package_dir(current / part):
            current = current / part
        elif (current / f"{part}.py").is_file():
            current = current / f"{part}.py"
        else:
            return f"no module {'.'.join(module_parts)!r}"
    if current.is_dir():
        if (current / attribute).is_dir() or (current / f"{attribute}.py").is_file():
            return None  # a submodule
        source_file = current / "__init__.py"
        if not source_file.is_file():
            return f"{'.'.join(module_parts)!r} defines no {attribute!r}"
    else:
        source_file = current
    try:
        tree = ast.parse(source_file.read_text(encoding="utf-8"), filename=str(source_file))
    except SyntaxError as exc:
        return f"syntax error in {source_file.name} line {exc.lineno}: {exc.msg}"
    names, star = _bound_names(tree)
    if attribute in names or star:
        return None
    return f"{'.'.join(module_parts)!r} defines no {attribute!r}"
