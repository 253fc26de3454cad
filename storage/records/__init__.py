"""The record domains behind :class:`storage.repository.Repository`, one module per domain.

==================  ===============================================================
module              domain
==================  ===============================================================
``_core``           tables, dialect helpers (upsert, row locks), the engine
``dicom``           patients, studies, series, instances: recording and reading
``completeness``    stable/received claims of series and studies, emitted marks
``associations``    open DICOM associations (they hold claims back)
``config``          peers, cluster nodes, application settings
``services``        installed service versions, their job specs, workers
``sessions``        processing sessions, their exactly-once claims, job runs
``session_data``    session data values and session files
==================  ===============================================================

Each domain is a mixin over :class:`storage.records._core.RecordsCore` (the engine); the
repository composes them. Import the public names from :mod:`storage.repository`.
"""
