"""One virtual environment per service version, when its ``module/requirements.txt`` exists.

dcm-processor G0 installed every service's requirements into one shared worker interpreter
(reference/dcm_processor.md §1.3), so two services could break each other. dcmflow builds a
venv per service version instead, once, under ``DCMFLOW_HOME/venvs/<service>/<version>-<hash>``
(the hash is of ``requirements.txt``, so an edited file is a new environment):

* ``python -m venv --system-site-packages --without-pip``, plus a ``.pth`` file naming the
  project interpreter's ``site-packages``: everything dcmflow has installed is visible, so a
  requirement that is already satisfied (the example's ``pydicom``) needs no download, and
  the build takes about a second, offline;
* ``python -m pip install -r requirements.txt`` with the new interpreter (pip comes from
  that shared ``site-packages``); what it installs lands in the venv and wins over the
  shared copies;
* a ``.dcmflow-ready`` marker is written last; builders hold a file lock, so concurrent jobs
  of one service build it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import shutil
import site
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from storage.keys import validate_name

from tasks.errors import EnvironmentBuildError

if TYPE_CHECKING:
    from services_registry.spec import ServiceSpec

__all__ = ["REQUIREMENTS", "READY_MARKER", "service_python", "venv_dir", "callback_interpreter"]

logger = logging.getLogger(__name__)

REQUIREMENTS = "requirements.txt"
"""File in a service's ``module/`` folder that asks for its own environment."""

READY_MARKER = ".dcmflow-ready"
"""Written into a venv once it is complete."""


def _python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def service_python(module_dir: Path | None, venvs_dir: Path, service: str, version: str | int | None) -> str:
    """The interpreter a job of this service runs with, building its venv when needed.

    Parameters
    ----------
    module_dir
        The service's ``module/`` folder (``None`` for services without one).
    venvs_dir
        ``DCMFLOW_HOME/venvs``.
    service, version
        Name and installed version, naming the cached environment.

    Returns
    -------
    str
        ``sys.executable`` when there is no ``requirements.txt``, else the venv's python.

    Raises
    ------
    EnvironmentBuildError
        ``venv`` or ``pip install`` failed (the message carries pip's last line).
    """
    venv = venv_dir(module_dir, venvs_dir, service, version)
    if venv is None:
        return sys.executable
    assert module_dir is not None
    requirements = module_dir / REQUIREMENTS
    if (venv / READY_MARKER).is_file():
        return str(_python_of(venv))
    venv.parent.mkdir(parents=True, exist_ok=True)
    with (venv.parent / f".{venv.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / READY_MARKER).is_file():
            return str(_python_of(venv))
        shutil.rmtree(venv, ignore_errors=True)
        _build(venv, requirements)
    return str(_python_of(venv))


def callback_interpreter(venvs_dir: Path) -> Callable[[ServiceSpec], str]:
    """The interpreter a service's callbacks are evaluated with: its jobs' own venv when it has
    one (built here if needed), dcmflow's for installed distributions (entry points).

    A venv that fails to build leaves the callbacks in dcmflow's interpreter (logged): the
    job then fails on the same build with pip's message, visibly, as it did before callbacks
    ran in the service's environment.
    """

    def python(spec: ServiceSpec) -> str:
        if spec.source == "entry_point":
            return sys.executable
        version = int(spec.version) if spec.version and spec.version.isdigit() else 0  # as the planner records it
        try:
            return service_python(spec.module_dir, venvs_dir, spec.name, version)
        except EnvironmentBuildError as exc:
            logger.warning("service %s: callbacks run in dcmflow's interpreter: %s", spec.name, exc)
            return sys.executable

    return python


def venv_dir(module_dir: Path | None, venvs_dir: Path, service: str, version: str | int | None) -> Path | None:
    """Where the venv of this service version lives (built or not), or ``None`` when it needs none.

    ``dcmflow doctor`` asks this to tell whether a service's environment is built yet.
    """
    requirements = module_dir / REQUIREMENTS if module_dir is not None else None
    if requirements is None or not requirements.is_file():
        return None
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:12]
    return venvs_dir / validate_name(service, "service name") / f"{version or 0}-{digest}"


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise EnvironmentBuildError(f"{what} failed: {lines[-1] if lines else f'exit code {done.returncode}'}")


def _build(venv: Path, requirements: Path) -> None:
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], f"venv {venv}")
    python = _python_of(venv)
    found = subprocess.run(
        [str(python), "-c", "import site; print(site.getsitepackages()[0])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    shared = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(found, "_dcmflow_shared.pth").write_text("".join(f"{p}\n" for p in shared))
    _run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q", "-r", str(requirements)],
        f"pip install -r {requirements}",
    )
    (venv / READY_MARKER).write_text(requirements.read_text())
