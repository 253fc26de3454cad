"""The one rule that turns a job's ``priority`` into the rank everything sorts by.

dcm-processor G0 used ``priority`` as the RQ queue name and its workers served the queues
``default``, ``medium``, ``low`` in that order (reference/dcm_processor.md §2.5); ``high`` is
ours, above them. The rule lives here, in the lowest layer, because both the records
(``priority_rank`` columns, so queries sort like plans) and the job spec of
:mod:`services_registry.spec` (validation and the planner's ready order) need it, and
``storage`` imports none of the others (DESIGN.md).
"""

from __future__ import annotations

__all__ = ["PRIORITY_RANKS", "DEFAULT_PRIORITY", "DEFAULT_PRIORITY_RANK", "priority_rank"]

PRIORITY_RANKS: dict[str, int] = {"high": 40, "default": 30, "medium": 20, "low": 10}
"""Rank of each priority name; higher runs first."""

DEFAULT_PRIORITY = "default"
"""Priority of a job that names none (the seed's ``DEFUALT_PRIORITY`` env default)."""

DEFAULT_PRIORITY_RANK = PRIORITY_RANKS[DEFAULT_PRIORITY]
"""Rank of :data:`DEFAULT_PRIORITY`."""


def priority_rank(priority: str | int) -> int:
    """The ordering rank of a priority name or integer; higher runs first.

    An integer *is* its rank, on the same scale as the names (``35`` runs after ``high`` and
    before ``default``); so is an integer written as text (records keep ``priority`` as text).

    Raises
    ------
    ValueError
        For a name other than ``high``, ``default``, ``medium`` or ``low`` (in G0 an unknown
        name silently created a queue no worker read).
    """
    if isinstance(priority, bool):
        raise ValueError(f"bad priority {priority!r}")
    if isinstance(priority, int):
        return priority
    text = priority.strip().lower()
    if text in PRIORITY_RANKS:
        return PRIORITY_RANKS[text]
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"unknown priority {priority!r} (one of {', '.join(PRIORITY_RANKS)} or an integer)"
        ) from None
