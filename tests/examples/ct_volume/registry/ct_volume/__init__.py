def wants(jobName, headers, params, added_params, **kwargs):
    """Run on CT series only; tell the worker which series it got."""
    if headers.get("Modality") != "CT":
        return False
    return True, {"series": headers["seriesId"]}
