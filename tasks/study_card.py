"""The study card of a new study: read from the records, published as an artifact, POSTed to a webhook.

=============================  =====================================================
task                           does
=============================  =====================================================
:func:`read_study_card`        what the records know of a study (gaps filled from the
                               ``dicom.study.received`` payload)
:func:`publish_study_card`     markdown artifact ``study-<uid, dots→dashes>`` on the run
:func:`post_study_card`        POSTs the card as JSON to ``DCMFLOW_STUDY_WEBHOOK_URL``
=============================  =====================================================

The webhook URL often holds a secret (``user:password@``, a token in the path or the query):
credentials become HTTP basic auth, and every log line and error names the URL through
:func:`redact_url` (no credentials, no query). The retries of :func:`post_study_card` come
from the settings through ``.with_options(...)`` in the flow (see :func:`webhook_options`);
a 4xx answer other than 408/429 is not retried, since sending the same card again will not
change it.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

import httpx
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from storage.keys import validate_uid

from tasks._storage import RuntimeSettings, repository_of
from tasks.errors import SeriesNotFoundError, WebhookError

if TYPE_CHECKING:
    from prefect import Task
    from prefect.client.schemas.objects import TaskRun
    from prefect.states import State

    from storage.models import PatientPublic, SeriesPublic, StudyPublic

__all__ = [
    "StudyCard",
    "WebhookError",
    "WebhookSettings",
    "card_artifact_key",
    "card_markdown",
    "study_card",
    "redact_url",
    "webhook_options",
    "read_study_card",
    "publish_study_card",
    "post_study_card",
]

ARTIFACT_DESCRIPTION = "new study"
"""Description of every study-card artifact."""

USER_AGENT = "dcmflow-study-card/1"

_RETRIED_STATUSES = frozenset({408, 425, 429})  # plus every 5xx
_SERIES_PAGE = 1000

# PS3.5 §6.2 DA: YYYYMMDD; "YYYY.MM.DD" is the ACR-NEMA form older devices still send.
_RE_DA = re.compile(r"^(\d{4})\.?(\d{2})\.?(\d{2})$")
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>|~])")  # enough inside a table cell: no emphasis, link, HTML


class WebhookSettings(Protocol):
    """What :func:`post_study_card` reads from ``dcmflow.settings.Settings``."""

    study_webhook_url: Any  # SecretStr | str | None
    study_webhook_timeout: float
    study_webhook_retries: int
    study_webhook_retry_delay: float


@dataclass(frozen=True, slots=True)
class StudyCard:
    """What a person (or a webhook) is told about a study that has just arrived.

    Attributes
    ----------
    study_uid : str
        Study Instance UID.
    patient_name : str
        Patient's Name as received (DICOM PN, components joined by ``^``).
    patient_id : str
        Patient ID.
    accession_number : str
        Accession Number (the RIS order).
    study_description : str
        Study Description.
    study_date : str
        Study Date as ``YYYY-MM-DD`` when it is a valid DA, else the raw value received.
    modalities : tuple of str
        Modalities of its series, in order of receipt.
    calling_ae : str
        AE title that sent its first series.
    first_received_at : str or None
        When its first instance arrived (ISO 8601, UTC).
    series_count : int
        Series received so far.
    instance_count : int
        Distinct SOP instances received so far.
    """

    study_uid: str
    patient_name: str
    patient_id: str
    accession_number: str
    study_description: str
    study_date: str
    modalities: tuple[str, ...]
    calling_ae: str
    first_received_at: str | None
    series_count: int
    instance_count: int

    def as_json(self) -> dict[str, Any]:
        """The card as a JSON object (what the webhook receives)."""
        data = asdict(self)
        data["modalities"] = list(self.modalities)
        return data


def card_artifact_key(study_uid: str) -> str:
    """``study-1-2-3``: the artifact key of a study's card (history per study)."""
    return f"study-{study_uid.replace('.', '-')}"


# --------------------------------------------------------------------------- pure helpers


def _study_date(raw: str) -> str:
    match = _RE_DA.fullmatch(raw.strip())
    if match is None:
        return raw
    year, month, day = (int(x) for x in match.groups())
    try:
        return dt.date(year, month, day).isoformat()
    except ValueError:
        return raw


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat()


def _parse_iso(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def _modalities(value: Any) -> list[str]:
    items = value.split("\\") if isinstance(value, str) else value if isinstance(value, list | tuple) else []
    return [str(x).strip() for x in items if str(x).strip()]


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def study_card(
    study: StudyPublic,
    patient: PatientPublic | None,
    series: Sequence[SeriesPublic],
    received: Mapping[str, Any] | None = None,
) -> StudyCard:
    """The card of a study from its records; ``received`` (the event payload) fills gaps.

    Parameters
    ----------
    study, patient, series
        The study's records (``series`` in any order).
    received
        ``dicom.study.received`` payload, or ``None``. Its ``calling_ae`` (the sender of the
        first series, as the receiver saw it) wins over the series records, which keep the
        last sender; its other values are used only where the records are empty.

    Returns
    -------
    StudyCard
    """
    event = dict(received or {})
    ordered = sorted(
        series, key=lambda s: (s.first_received_at or dt.datetime.max.replace(tzinfo=dt.UTC), s.number or 0, s.series_uid)
    )
    modalities = _modalities(study.modalities)
    for s in ordered:
        if s.modality and s.modality not in modalities:
            modalities.append(s.modality)
    firsts = [s.first_received_at for s in ordered if s.first_received_at is not None]
    event_first = _parse_iso(event.get("first_received_at"))
    if event_first is not None:
        firsts.append(event_first)
    calling_ae = _text(event.get("calling_ae")) or next((s.calling_ae for s in ordered if s.calling_ae), "")
    series_count = len(ordered) or len(event.get("series_uids") or [])
    instance_count = sum(s.instance_count for s in ordered) if ordered else _count(event.get("instance_count"))
    return StudyCard(
        study_uid=study.study_uid,
        patient_name=patient.name if patient is not None else "",
        patient_id=(patient.patient_id if patient is not None else "") or _text(event.get("patient_id")),
        accession_number=study.accession_number,
        study_description=study.description or _text(event.get("description")),
        study_date=_study_date(study.date),
        modalities=tuple(modalities or _modalities(event.get("modalities"))),
        calling_ae=calling_ae,
        first_received_at=_iso(min(firsts)) if firsts else None,
        series_count=series_count,
        instance_count=instance_count,
    )


def _md(value: object) -> str:
    """``value`` as inert markdown text on one line (values come from the wire)."""
    text = " ".join(str(value).split())
    return _MD_SPECIAL.sub(r"\\\1", text) if text else "–"


def card_markdown(card: StudyCard) -> str:
    """The card as markdown: a title line and a two-column table."""
    patient = card.patient_name or "(no name)"
    title = " · ".join(x for x in (" ".join(card.modalities), card.study_description, patient) if x)
    rows = [
        ("Patient", f"{_md(patient)} (ID {_md(card.patient_id)})"),
        ("Accession number", _md(card.accession_number)),
        ("Study description", _md(card.study_description)),
        ("Study date", _md(card.study_date)),
        ("Modalities", _md(", ".join(card.modalities))),
        ("Calling AE", _md(card.calling_ae)),
        ("First instance received", _md(card.first_received_at or "")),
        ("Series", str(card.series_count)),
        ("Instances", str(card.instance_count)),
        ("Study Instance UID", f"`{card.study_uid}`"),
    ]
    lines = [f"### New study: {_md(title)}", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- webhook URL


@dataclass(frozen=True, slots=True)
class _Target:
    url: str  # without user:password@
    auth: tuple[str, str] | None
    shown: str  # safe to log
    secrets: tuple[str, ...]  # strings that must never appear in a message


def _secret_value(value: Any) -> str:
    if value is None:
        return ""
    raw = value.get_secret_value() if hasattr(value, "get_secret_value") else value
    return str(raw).strip()


def redact_url(url: str) -> str:
    """``url`` fit for a log line: scheme, host, port and path; no credentials, query or fragment.

    A query (where tokens usually are) shows as ``?…``. Anything unparsable shows as ``<webhook URL>``.
    """
    try:
        parsed = httpx.URL(url)
    except Exception:  # noqa: BLE001 - an unparsable URL is still never shown
        return "<webhook URL>"
    if not parsed.scheme or not parsed.host:
        return "<webhook URL>"
    port = f":{parsed.port}" if parsed.port is not None else ""
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    return f"{parsed.scheme}://{host}{port}{parsed.path}" + ("?…" if parsed.query else "")


def _target(raw: str) -> _Target:
    shown = redact_url(raw)
    try:
        parsed = httpx.URL(raw)
    except Exception:  # noqa: BLE001
        parsed = None
    if parsed is None or parsed.scheme not in {"http", "https"} or not parsed.host:
        raise WebhookError(f"DCMFLOW_STUDY_WEBHOOK_URL is not an http(s) URL with a host ({shown})", retryable=False)
    auth = (parsed.username, parsed.password) if parsed.userinfo else None
    url = str(parsed.copy_with(username=None, password=None)) if parsed.userinfo else raw
    secrets = tuple(x for x in (raw, *(auth or ()), parsed.query.decode("ascii", "replace")) if x)
    return _Target(url=url, auth=auth, shown=shown, secrets=secrets)


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return " ".join(text.split())


def _retry_if_worth_it(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the failure was a final answer (a 4xx)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return not isinstance(exc, WebhookError) or exc.retryable


def webhook_options(settings: WebhookSettings) -> dict[str, Any]:
    """``.with_options(...)`` of :func:`post_study_card`: retries with exponential backoff."""
    retries = settings.study_webhook_retries
    delays = exponential_backoff(backoff_factor=settings.study_webhook_retry_delay)(retries)
    return {"retries": retries, "retry_delay_seconds": delays}


# --------------------------------------------------------------------------- tasks


@task(name="read-study-card", cache_policy=NO_CACHE)
def read_study_card(settings: RuntimeSettings, study_uid: str, received: Mapping[str, Any] | None = None) -> StudyCard:
    """The study's card from the records database, gaps filled from ``received``.

    Raises
    ------
    storage.errors.InvalidKeyError
        ``study_uid`` is not a UID (PS3.5 §9.1).
    tasks.errors.SeriesNotFoundError
        No received study has that UID.
    """
    validate_uid(study_uid, "Study Instance UID")
    logger = get_run_logger()
    if received and received.get("study_uid") not in (None, "", study_uid):
        logger.warning("ignoring the received payload: it is about study %s", _text(received.get("study_uid")))
        received = None
    repository = repository_of(settings)
    study = repository.get_study(study_uid)
    if study is None:
        raise SeriesNotFoundError(f"no received study with Study Instance UID {study_uid}")
    series: list[SeriesPublic] = []
    while True:
        page = repository.list_series(_SERIES_PAGE, len(series), study_uid=study_uid)
        series += page
        if len(page) < _SERIES_PAGE:
            break
    return study_card(study, repository.get_patient(study.patient_id), series, received)


@task(name="publish-study-card", cache_policy=NO_CACHE)
def publish_study_card(card: StudyCard) -> str:
    """Create the card's markdown artifact on the flow run; its key."""
    key = card_artifact_key(card.study_uid)
    create_markdown_artifact(card_markdown(card), key=key, description=ARTIFACT_DESCRIPTION)
    return key


@task(name="post-study-card", cache_policy=NO_CACHE, retry_condition_fn=_retry_if_worth_it)
def post_study_card(settings: WebhookSettings, card: StudyCard) -> int:
    """POST the card as JSON to ``DCMFLOW_STUDY_WEBHOOK_URL``; the 2xx status it answered.

    Raises
    ------
    WebhookError
        Unreachable, timed out, or answered other than 2xx (``retryable`` unless a 4xx
        other than 408/425/429). The message names the URL without credentials or query.
    """
    from prefect.runtime import task_run

    target = _target(_secret_value(settings.study_webhook_url))
    attempt, attempts = int(task_run.run_count or 1), settings.study_webhook_retries + 1
    logger = get_run_logger()
    try:
        with httpx.Client(timeout=settings.study_webhook_timeout, follow_redirects=False) as client:
            response = client.post(
                target.url,
                json=card.as_json(),
                auth=target.auth or httpx.USE_CLIENT_DEFAULT,
                headers={"User-Agent": USER_AGENT, "X-Dcmflow-Event": "dicom.study.received"},
            )
    except httpx.TimeoutException:
        problem, retryable = f"did not answer within {settings.study_webhook_timeout:g} s", True
    except httpx.HTTPError as exc:
        problem, retryable = f"unreachable ({type(exc).__name__}: {exc})", True
    else:
        if response.is_success:
            logger.info("study card of %s posted to %s: %d", card.study_uid, target.shown, response.status_code)
            return response.status_code
        status = response.status_code
        problem = f"answered {status} {response.reason_phrase}".rstrip()
        retryable = status >= 500 or status in _RETRIED_STATUSES
    if not retryable:
        when = "not retried: the same request would get the same answer"
    elif attempt < attempts:
        when = f"attempt {attempt} of {attempts}, retrying"
    else:
        when = f"after {attempts} attempt{'s' if attempts > 1 else ''}"
    message = f"webhook {target.shown} {_scrub(problem, target.secrets)} ({when})"
    logger.warning("%s", message)
    raise WebhookError(message, retryable=retryable)
