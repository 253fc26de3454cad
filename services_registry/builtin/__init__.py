"""Services that come with dcmflow, each off until enabled (``dcmflow services enable NAME``).

Each module holds one service built with the Python API (:class:`services_registry.Service`)
and is advertised under the ``dcmflow.services`` entry point group in dcmflow's own
``pyproject.toml``, the way any third-party distribution would advertise its services; they
are models of how to write one. Their workers keep dcm-processor's calling convention, read
the series from ``$DATA/<headers['dcmpath']>`` and write their outputs under ``$DATA``, which
dcmflow stores as session files in the object store.

A worker may return ``{"artifacts": [{"type": "markdown" | "image", "path": ..., "title": ...}]}``
to have an output shown on the flow run in the Prefect UI (:mod:`tasks.jobs`).
"""
