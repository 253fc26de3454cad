"""``study-received``: the new-study automation's flow (one run per ``dicom.study.received``).

The receiver emits ``dicom.study.received`` once per study; the trigger declared in
``deployments/prefect.yaml`` starts the ``study-received`` deployment with
``study_uid`` and ``received`` (the event payload). The flow is a short sequence (STYLE.md
§9): read the study card from the records, publish it as the artifact
``study-<uid, dots→dashes>``, then POST it to ``DCMFLOW_STUDY_WEBHOOK_URL`` when one is set.
It runs in its own flow run, so a slow or broken webhook never holds up the receiver.

Quick start::

    from flows.new_study import study_received

    state = study_received("1.2.840.113619.2.55.3", return_state=True)
    state.is_completed()   # False: unknown/invalid UID, or the webhook refused the card

or, from a shell: ``prefect deployment run study-received/study-received --param study_uid='"1.2.3"'``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from pydantic import Field
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from storage.errors import StorageError
from storage.keys import is_valid_uid
from tasks.errors import TaskError
from tasks.study_card import post_study_card, publish_study_card, read_study_card, redact_url, webhook_options

from flows._settings import load_settings

__all__ = ["study_received"]

_STUDY_UID_DOC = "Study Instance UID of a received study (digits and dots, at most 64 characters)."
_RECEIVED_DOC = (
    "Payload of the dicom.study.received event that started this run (the trigger passes {{ event.payload }}). "
    "Leave empty for a manual run: the card is then read from the records alone."
)


def _short(uid: str) -> str:
    return uid if len(uid) <= 14 else "…" + uid[-12:]


def _run_name() -> str:
    """``new study CT/MR 'CHEST' …123456789012``: from the event when there is one, else the records."""
    params = flow_run.parameters
    uid = str(params.get("study_uid", ""))
    received = params.get("received")
    modalities: list[str] = []
    description = ""
    try:
        if isinstance(received, dict) and received.get("study_uid") in (None, uid):
            raw = received.get("modalities") or []
            modalities = [str(m) for m in (raw.split("\\") if isinstance(raw, str) else raw) if m]
            description = str(received.get("description") or "")
        elif is_valid_uid(uid):
            from tasks._storage import repository_of

            study = repository_of(load_settings()).get_study(uid)
            if study is not None:
                modalities = [m for m in study.modalities.split("\\") if m]
                description = study.description
    except Exception:  # noqa: BLE001 - a name must never fail the run
        pass
    words = ["new study", "/".join(modalities), repr(description) if description else "", _short(uid)]
    return " ".join(w for w in words if w)


def _reason(state: State) -> str:
    """The one line a failed task's exception says (ours are one line; others: type and first line)."""
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, TaskError | StorageError):
        return str(exc)
    if isinstance(exc, BaseException):
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return state.message or "failed"


@flow(name="study-received", flow_run_name=_run_name, validate_parameters=True)
def study_received(
    # Field(description=...) because Prefect 3 reads parameter descriptions for the UI and the
    # deployment's parameter schema from Google-style docstrings only, not numpydoc.
    study_uid: str = Field(description=_STUDY_UID_DOC),
    received: dict[str, Any] | None = Field(None, description=_RECEIVED_DOC),
) -> State:
    """Publish the study card of a newly received study, and POST it to the study webhook.

    The card (patient name and ID, accession number, study description and date,
    modalities, calling AE, time of the first instance, series and instance counts) is read
    from the records database and becomes the markdown artifact ``study-<uid with dots as
    dashes>`` of this run. When ``DCMFLOW_STUDY_WEBHOOK_URL`` is set, the same card is
    POSTed to it as JSON, retried with exponential backoff; a final failure fails the run
    (the artifact exists by then).

    Parameters
    ----------
    study_uid
        Study Instance UID of a received study (digits and dots, at most 64 characters).
    received
        Payload of the ``dicom.study.received`` event that started this run (the trigger
        passes ``{{ event.payload }}``). Optional: without it (a manual run) the card is
        built from the records alone; with it, the calling AE and the time of the first
        instance come from the event and it fills what the records lack.

    Returns
    -------
    State
        Completed with the card (a dict) as its result; Failed with one line saying why.
    """
    if not is_valid_uid(study_uid):
        return Failed(message=f"invalid Study Instance UID {study_uid!r}: expected digits and dots, at most 64 characters")
    settings = load_settings()
    read = read_study_card(settings, study_uid, received, return_state=True)
    if not read.is_completed():
        return Failed(message=_reason(read))
    card = read.result()
    key = publish_study_card(card)
    data = card.as_json()
    url = settings.study_webhook_url.get_secret_value().strip() if settings.study_webhook_url else ""
    if not url:
        return Completed(message=f"study card published as artifact {key} (no webhook configured)", data=data)
    posted = post_study_card.with_options(**webhook_options(settings))(settings, card, return_state=True)
    if not posted.is_completed():
        return Failed(message=f"study card of {study_uid} not delivered: {_reason(posted)}")
    return Completed(message=f"study card published as artifact {key} and posted to {redact_url(url)}", data=data)
