import os
from pathlib import Path


def measure(jobName, headers, params, added_params, **kwargs):
    """Write $DATA/ct-volume/<series>.txt with the number of slices received."""
    data = Path(os.environ["DATA"])
    slices = len(list((data / headers["dcmpath"]).glob("*.dcm")))
    out = data / "ct-volume"
    out.mkdir(exist_ok=True)
    (out / f"{added_params['ct-volume']['series']}.txt").write_text(f"{slices} slices\n")
