"""All record reads and writes of dcmflow, one transaction per method.

:class:`Repository` is the only code that writes records. Each public method runs in its own
transaction and returns detached values (``*Public`` models or frozen dataclasses), so a
caller can never lazy-load through a closed session.

SQLite and PostgreSQL behave alike:

* upserts use the dialect's ``INSERT … ON CONFLICT`` (``sqlalchemy.dialects.sqlite`` /
  ``postgresql``);
* writers that read first (record, claim, register) lock what they read: on PostgreSQL with
  ``SELECT … FOR UPDATE`` (``SKIP LOCKED`` for claims, so claimers never wait for each other);
  on SQLite with ``BEGIN IMMEDIATE`` (one writer at a time, see
  :func:`storage.db.write_transaction`), and every claim ``UPDATE`` re-checks the state it
  expects, so a series is handed to exactly one claimer.

One class, many domains
-----------------------
The methods live in :mod:`storage.records`, one module per domain (DICOM records,
completeness claims, associations, peers/nodes/settings, services, sessions and jobs,
session data), each a mixin over one small core that holds the engine, in the manner of
Prefect's ``prefect/server/models/*.py``. :class:`Repository` composes them, so callers keep
one object and one API, and the values it returns are re-exported here. The domains'
own rules are in their modules: completeness in :mod:`storage.records.completeness`,
session claims in :mod:`storage.records.sessions`, open associations in
:mod:`storage.records.associations`.
"""

from __future__ import annotations

from storage.records.associations import AssociationRecords
from storage.records.completeness import (
    DEFAULT_ASSOCIATION_TIMEOUT,
    DEFAULT_RECLAIM_AFTER,
    MAX_CLAIM_ADDED_SOP_UIDS,
    CompletenessRecords,
    SeriesClaim,
    StudyClaim,
    StudyReceivedClaim,
)
from storage.records.config import ConfigRecords
from storage.records.dicom import DicomRecords, InstanceIn, RecordOutcome, RecordStatus
from storage.records.services import ServiceRecords
from storage.records.session_data import SessionDataRecords
from storage.records.sessions import SessionClaim, SessionRecords, StaleClaim

__all__ = [
    "DEFAULT_ASSOCIATION_TIMEOUT",
    "InstanceIn",
    "RecordStatus",
    "RecordOutcome",
    "SeriesClaim",
    "StudyClaim",
    "StudyReceivedClaim",
    "SessionClaim",
    "StaleClaim",
    "DEFAULT_RECLAIM_AFTER",
    "MAX_CLAIM_ADDED_SOP_UIDS",
    "Repository",
]


class Repository(
    DicomRecords,
    CompletenessRecords,
    AssociationRecords,
    ConfigRecords,
    ServiceRecords,
    SessionRecords,
    SessionDataRecords,
):
    """Transactions over the record database (see the module docstring).

    Parameters
    ----------
    engine
        From :func:`storage.db.create_engine`, on a database migrated with
        :func:`storage.db.upgrade`.
    """
