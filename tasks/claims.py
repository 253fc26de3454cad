"""Claiming a (series or study, revision) when the run that held it died.

A triggered run claims its revision (:meth:`storage.repository.Repository.claim_session`, a
unique key). When the worker running it dies (``kill -9``, the machine is lost) its session
stays ``running`` and keeps the claim, so the run Prefect starts again (the ``rerun-crashed``
triggers of ``deployments/prefect.yaml``) would end "already processed". So a run that finds
the claim held asks whether the holder is provably dead: its session still says ``running``
while Prefect reports its flow run in a final state (Crashed, usually set by the zombie
automation) or no longer knows it. Then the holder's claim is released (session and its
running jobs ``crashed``, the reason kept as session data ``released``) and the run claims
again. The unique key still decides between racing runs: of two that see the same dead
holder, one release succeeds and one insert wins; the other ends "already processed".

A revision whose runs keep dying (a job that takes the machine down, an out-of-memory kill of
the flow's process) is not run again for ever: after :data:`MAX_CRASHED_SESSIONS` crashed
sessions the next run records its session as failed and stops (:class:`GaveUp`).

Plain functions, except :func:`prefect_dead_run`, which asks the Prefect API.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from uuid import UUID

from storage.models import SessionState

if TYPE_CHECKING:
    from storage.repository import Repository, SessionClaim

__all__ = ["DeadRun", "GaveUp", "MAX_CRASHED_SESSIONS", "claim_revision", "give_up_if_crashing", "prefect_dead_run"]

DeadRun = Callable[[str], str | None]
"""Given a flow run id: why that run can no longer finish (one line), or ``None`` if it may."""

MAX_CRASHED_SESSIONS = 3
"""Crashed sessions of one revision after which its next run gives up instead of running it."""


@dataclass(frozen=True)
class GaveUp:
    """A run that claimed a revision whose earlier runs crashed too often; its session is failed."""

    session_id: int
    message: str


def claim_revision(
    repository: Repository,
    level: str,
    uid: str,
    revision: int,
    *,
    study_uid: str,
    trigger: str,
    flow_run_id: str | None,
    dead_run: DeadRun | None,
) -> SessionClaim:
    """Claim (level, uid, revision); if a provably dead run holds it, take the claim over.

    Parameters
    ----------
    dead_run
        Asks whether the holder's flow run is dead (:func:`prefect_dead_run` in a flow run);
        ``None``: never take over.

    Returns
    -------
    SessionClaim
        As :meth:`Repository.claim_session`: the new session, or the live (or finished) holder.
    """

    def claim() -> SessionClaim:
        return repository.claim_session(level, uid, revision, study_uid=study_uid, trigger=trigger, flow_run_id=flow_run_id)

    claimed = claim()
    holder = claimed.session
    if claimed.claimed or dead_run is None or holder.state != SessionState.RUNNING.value:
        return claimed
    if not holder.flow_run_id or holder.flow_run_id == flow_run_id:
        return claimed  # a run outside Prefect, or this very run: nothing to prove dead
    why = dead_run(holder.flow_run_id)
    if why is None:
        return claimed
    taker = f"flow run {flow_run_id}" if flow_run_id else "a run outside Prefect"
    # False when a racing run released it first: then the unique key picks one of us below
    repository.release_claim(holder.id, reason=f"{why}; its claim was taken over by {taker}")
    return claim()


def crashed_sessions(repository: Repository, level: str, uid: str, revision: int) -> list[int]:
    """Ids of the crashed sessions of (level, uid, revision), oldest first."""
    if level == "series":
        sessions = repository.list_sessions(series_uid=uid)
    else:
        sessions = [s for s in repository.list_sessions(study_uid=uid) if s.series_uid is None]
    return [s.id for s in sessions if s.revision == revision and s.state == SessionState.CRASHED.value]


def give_up_if_crashing(repository: Repository, session_id: int, level: str, uid: str, revision: int) -> GaveUp | None:
    """Fail the just-claimed session when the revision already crashed too often, else ``None``.

    The failed session keeps the claim, so later triggers of the revision end at once;
    ``dcmflow reprocess`` still runs it by hand.
    """
    crashed = crashed_sessions(repository, level, uid, revision)
    if len(crashed) < MAX_CRASHED_SESSIONS:
        return None
    message = (
        f"{level} {uid} revision {revision} crashed {len(crashed)} times (sessions "
        f"{', '.join(map(str, crashed))}): not run again; `dcmflow reprocess` runs it by hand"
    )
    repository.put_session_data(session_id, "gave_up", message)
    repository.finish_session(session_id, SessionState.FAILED.value)
    return GaveUp(session_id=session_id, message=message)


def prefect_dead_run(flow_run_id: str) -> str | None:
    """Why the flow run can no longer finish, from the Prefect API; ``None`` while it may.

    Dead: Prefect reports it in a final state (Crashed, Cancelled, Failed, Completed) although
    its session is still ``running``, or the server does not know it any more.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        run_id = UUID(flow_run_id)
    except ValueError:
        return None
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(run_id)
    except ObjectNotFound:
        return f"flow run {flow_run_id} no longer exists on the Prefect server"
    state = run.state
    if state is None or not state.is_final():
        return None
    detail = f" ({' '.join(state.message.split())})" if state.message else ""
    return f"flow run {flow_run_id} is {state.name}{detail}"
