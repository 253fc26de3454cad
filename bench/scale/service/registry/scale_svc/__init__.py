"""Callbacks of bench/scale's service: the series' SeriesDescription picks the jobs.

``SCALE SLEEP`` / ``SCALE CPU``: the 4-job DAG a -> (b, c) -> d; ``SCALE NOOP INLINE``: one
no-op job in the flow; ``SCALE NOOP GPU``: the same no-op job on channel ``gpu``.
"""


def _description(headers):
    return str(headers.get("SeriesDescription") or "").upper()


def dag(jobName, headers, params, added_params, **kwargs):
    return _description(headers) in ("SCALE SLEEP", "SCALE CPU")


def inline(jobName, headers, params, added_params, **kwargs):
    return _description(headers) == "SCALE NOOP INLINE"


def gpu(jobName, headers, params, added_params, **kwargs):
    return _description(headers) == "SCALE NOOP GPU"
