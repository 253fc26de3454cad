"""What a job asked to show on the flow run: its markdown reports and images, as Prefect artifacts.

A worker names the outputs to show in the dict it returns (our extension of dcm-processor's
result, beside its ``storage`` key)::

    {"artifacts": [{"type": "markdown", "path": "qc/1.2.3.md", "title": "QC"},
                   {"type": "image", "path": "preview/1.2.3.png", "title": "Middle slice"}]}

``path`` is the output's path under ``$DATA``, i.e. the name of one of the job's session files:
the bytes are read back from the object store, so this works the same for a job that ran on
another machine. A job that did not succeed returns nothing; its markdown outputs (a report
saying why it failed, such as a QC report over the user's thresholds) are shown instead.

Images are embedded as ``data:`` URIs in one markdown artifact per job (the Prefect UI
renders markdown images and has no store of its own for files); an image over
:data:`MAX_EMBEDDED_BYTES` is named with its object key instead, so an artifact stays small.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storage.errors import StorageError
from storage.models import JobState

if TYPE_CHECKING:
    from storage.models import JobPublic, SessionFilePublic
    from storage.objects import ObjectStore
    from storage.repository import Repository

__all__ = ["MAX_EMBEDDED_BYTES", "JobArtifact", "job_artifact_key", "job_artifacts"]

MAX_EMBEDDED_BYTES = 512 * 1024
"""Largest image embedded in an artifact; larger ones are referred to by object key."""

_MAX_MARKDOWN_CHARS = 200_000


@dataclass(frozen=True)
class JobArtifact:
    """One markdown artifact: what a job asked to show, ready for ``create_markdown_artifact``."""

    job_name: str
    markdown: str
    description: str


def job_artifact_key(job_name: str, level: str, uid: str) -> str:
    """``preview-series-1-2-3``: Prefect artifact keys allow lowercase letters, digits and dashes."""
    job = re.sub(r"[^a-z0-9]+", "-", job_name.lower()).strip("-") or "job"
    return f"{job}-{level}-{uid.replace('.', '-')}"


def _requested(result: Any) -> list[Mapping[str, Any]]:
    entries = result.get("artifacts") if isinstance(result, Mapping) else None
    if isinstance(entries, Mapping):
        entries = [entries]
    if not isinstance(entries, (list, tuple)):
        return []
    return [e for e in entries if isinstance(e, Mapping) and isinstance(e.get("path"), str)]


def _section(entry: Mapping[str, Any], file: SessionFilePublic | None, store: ObjectStore) -> str:
    """The markdown of one requested output."""
    path = str(entry["path"])
    kind = str(entry.get("type") or ("image" if path.lower().endswith((".png", ".jpg", ".jpeg", ".gif")) else "markdown"))
    title = str(entry.get("title") or path)
    if file is None:
        return f"## {title}\n\n_no output `{path}` was stored_\n"
    if kind == "image" and file.size > MAX_EMBEDDED_BYTES:
        return f"## {title}\n\n`{path}` ({file.size} bytes, too large to embed) → object `{file.object_key}`\n"
    try:
        data = store.get(file.object_key)
    except StorageError as exc:
        return f"## {title}\n\n_cannot read `{path}`: {exc}_\n"
    if kind == "image":
        encoded = base64.b64encode(data).decode("ascii")
        return f"## {title}\n\n![{title}](data:{file.content_type};base64,{encoded})\n"
    text = data.decode("utf-8", errors="replace")
    if len(text) > _MAX_MARKDOWN_CHARS:
        text = text[:_MAX_MARKDOWN_CHARS] + f"\n\n_… cut at {_MAX_MARKDOWN_CHARS} characters; whole file: object `{file.object_key}`_"
    return text if text.endswith("\n") else text + "\n"


def job_artifacts(
    repository: Repository, store: ObjectStore, session_id: int, jobs: Sequence[JobPublic]
) -> list[JobArtifact]:
    """One artifact per job of the session that asked for one (or failed with a markdown report)."""
    files: dict[tuple[str, str], SessionFilePublic] = {
        (f.job_name, f.name): f for f in repository.list_session_files(session_id)
    }
    results = repository.job_session_data(session_id, "result")
    found = []
    for job in jobs:
        if job.state == JobState.SUCCEEDED:
            entries = _requested(results.get(job.job_name))
        elif job.state in {JobState.FAILED, JobState.TIMED_OUT}:
            entries = [{"type": "markdown", "path": name} for (owner, name) in files if owner == job.job_name and name.endswith(".md")]
        else:
            entries = []
        if not entries:
            continue
        sections = [_section(e, files.get((job.job_name, str(e["path"]))), store) for e in entries]
        found.append(
            JobArtifact(job.job_name, "\n".join(sections), f"{job.job_name} (session {session_id}, job {job.state})")
        )
    return found
