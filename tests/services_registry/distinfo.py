"""A real installed distribution advertising ``dcmflow.services``, written into a folder.

pip writes ``<name>-<version>.dist-info/`` (METADATA, entry_points.txt) next to the package;
a folder holding exactly that, put on ``sys.path`` (and ``PYTHONPATH`` for child processes),
is what :mod:`importlib.metadata` and ``import`` read, without installing into the shared venv.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

PACKAGE = "demo_dist_services"

SOURCE = '''
import json, os
from pathlib import Path

from services_registry import Service

service = Service("ignored-own-name", description="CT series report from an installed distribution")


@service.job(name="ep-ct-report", priority="high", timeout="2m", params={"out": "ep-reports"})
def report(jobName, headers, params, added_params, **kwargs):
    out = Path(os.environ["DATA"], params["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{headers['seriesId']}.json").write_text(json.dumps({"job": jobName, "modality": headers["Modality"]}))
    return {"written": f"{params['out']}/{headers['seriesId']}.json", "added": added_params.get(jobName)}


@report.callback
def only_ct(jobName, headers, params, added_params, **kwargs):
    return headers.get("Modality") == "CT", {"tag": "from-entry-point"}
'''


def write_distribution(site: Path, *, version: str = "1.0", source: str = SOURCE,
                       entry_name: str = "demo-dist", package: str = PACKAGE) -> Path:
    """Write (or rewrite) ``site/<package>/`` and its dist-info; returns ``site``."""
    for old in site.glob(f"{package}-*.dist-info"):
        shutil.rmtree(old)
    dist_info = site / f"{package}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}\nVersion: {version}\n")
    (dist_info / "entry_points.txt").write_text(f"[dcmflow.services]\n{entry_name} = {package}.services:service\n")
    pkg = site / package
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "services.py").write_text(textwrap.dedent(source))
    return site
