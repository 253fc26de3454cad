"""Callbacks of the series-summary example (dcm-processor calling convention).

A callback gets keyword arguments ``jobName, headers, params, added_params`` and returns
``bool`` or ``(bool, dict)``; the dict becomes ``added_params[jobName]`` for every worker.
"""

from .rules import accepted_modality


def accept(jobName, headers, params, added_params, **kwargs):
    """Schedule the summary for the modalities listed in ``params['modalities']``."""
    modality = accepted_modality(headers, (params or {}).get("modalities", ["CT", "MR"]))
    if modality is None:
        return False
    return True, {"modality": modality, "file": f"{headers['seriesId']}.json"}


def always(jobName, headers, params, added_params, **kwargs):
    """Run whenever the summary itself runs (its dependsOn drops it otherwise)."""
    return True, {"source": added_params.get("series-summary", {}).get("file")}
