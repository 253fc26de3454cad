import os
from pathlib import Path

from services_registry import Service

service = Service("ct-volume-py", description="Count the slices of a CT series")


@service.job(name="ct-volume-py", timeout="10m", priority="high", retries=2)
def measure(jobName, headers, params, added_params, **kwargs):
    data = Path(os.environ["DATA"])
    slices = len(list((data / headers["dcmpath"]).glob("*.dcm")))
    (data / f"{headers['seriesId']}.slices.txt").write_text(f"{slices} slices\n")


@measure.callback
def wants(jobName, headers, params, added_params, **kwargs):
    return headers.get("Modality") == "CT"
