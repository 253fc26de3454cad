"""Receiving processes: several SCPs behind one port, each writing its own spool, supervised.

Each receiving process (spawned) takes its spool's lock and recovers it, and sends the parent
what recovery found; the parent (:class:`ReceivingProcesses`) starts that spool's ingest
processes and lets it listen; it opens the association facts and caller policy on its own
repository, listens with ``SO_REUSEPORT`` (:mod:`receiver.reuseport`), says so, and serves. (The same order as a single process:
ingest runs before the port answers.) It stops when the parent sends "stop" on that pipe, or when
the pipe ends (the parent is gone). A pipe, not a multiprocessing Event: setting an Event that a
SIGKILLed process was waiting on blocks forever.

A receiving process that dies (``kill -9``, a crash) is restarted: its ingest processes are
stopped first (they finish their batch), the new process recovers the spool (a torn tail
record was never acknowledged and is dropped), and ingest starts again, so every acknowledged
record is ingested. No silent half capacity: every death is logged as an error, and more than
:data:`MAX_RESTARTS` within :data:`RESTART_WINDOW` seconds stop the whole receiver (``on_failure``).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from receiver.errors import ReceiverError
from receiver.ingest import IngestPool, StorageFactory
from receiver.scp import ScpConfig
from receiver.spool import RecoveryReport

__all__ = ["MAX_RESTARTS", "RESTART_WINDOW", "ReceivingProcesses", "ReceivingSpec"]

log = logging.getLogger("receiver")

MAX_RESTARTS = 3
"""Restarts of one receiving process allowed within :data:`RESTART_WINDOW`; one more stops the receiver."""

RESTART_WINDOW = 60.0
READY_TIMEOUT = 60.0
_PARENT_POLL = 0.5
_LISTEN = "listen"
_LISTENING = "listening"
_STOP = "stop"


@dataclass(frozen=True, kw_only=True)
class ReceivingSpec:
    """What one receiving process runs (picklable: it crosses a spawn).

    Attributes
    ----------
    index : int
        Which process (and spool) this is.
    spool_dir : Path
        Its spool folder.
    scp : ScpConfig
        Listening parameters (the real port, ``reuse_port`` set).
    min_free_bytes, min_free_fraction, segment_size
        The spool's watermark and segment size.
    ingest_workers : int
        Ingest processes that will read this spool (recovery sets their read marks).
    accept_any : bool
        Accept associations from any caller.
    trusted_networks : sequence of str
        Callers always accepted.
    storage : StorageFactory, optional
        Opens the repository for peers and association facts; ``None``: neither.
    log_level : int
        Logging level in the process.
    """

    index: int
    spool_dir: Path
    scp: ScpConfig
    min_free_bytes: int
    min_free_fraction: float
    segment_size: int
    ingest_workers: int
    accept_any: bool
    trusted_networks: Sequence[str]
    storage: StorageFactory | None
    log_level: int = logging.INFO


def _serve(spec: ReceivingSpec, conn: Any) -> None:
    """Entry point of a receiving process."""
    from receiver._tuning import set_pydicom_uid_validation
    from receiver.associations import AssociationTracker, CallerPolicy, PeerEntry, RepositoryFacts
    from receiver.scp import start_scp
    from receiver.spool import Spool

    logging.basicConfig(level=spec.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us through the pipe
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A process-wide pydicom setting, so only here, where the process is the SCP alone:
    # pynetdicom checks association UIDs itself (receiver._tuning).
    set_pydicom_uid_validation(False)
    parent = os.getppid()
    spool = Spool(
        spec.spool_dir,
        min_free_bytes=spec.min_free_bytes,
        min_free_fraction=spec.min_free_fraction,
        segment_size=spec.segment_size,
    )
    facts = server = None
    try:
        conn.send(spool.recover(max(spec.ingest_workers, 1)))
        # Listen only once the parent has started this spool's ingest (as a single process does).
        if conn.recv() != _LISTEN:
            return
        repository = spec.storage()[1] if spec.storage is not None else None
        peers = None
        if repository is not None:
            facts = RepositoryFacts(repository, pending_files=spool.has_files_of)

            def peers() -> list[PeerEntry]:
                return [PeerEntry(p.ae_title, p.host, p.tls) for p in repository.list_peers() if p.allow_send]

        policy = CallerPolicy(accept_any=spec.accept_any, trusted_networks=spec.trusted_networks, peers=peers)
        server = start_scp(spec.scp, spool, AssociationTracker(facts), policy)
        conn.send(_LISTENING)
        # Serve until asked; a parent gone without asking (SIGKILL) takes us along, so no
        # orphan keeps the port and the spool lock from a restarted receiver.
        while True:
            if conn.poll(_PARENT_POLL):
                if conn.recv() == _STOP:
                    break
            elif os.getppid() != parent:
                raise EOFError
    except EOFError:  # the pipe ended: the parent is gone
        log.error("receiving process %d: the receiver is gone; stopping", spec.index)
    except BaseException as exc:
        try:
            conn.send(exc)
        except Exception:
            conn.send(ReceiverError(f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    finally:
        if server is not None:
            server.shutdown()
        if facts is not None:
            facts.close()
        spool.unlock()  # logs the spool's counters


class ReceivingProcesses:
    """Start, supervise and stop the receiving processes, and the ingest of each spool.

    Parameters
    ----------
    specs : sequence of ReceivingSpec
        One per process.
    start_ingest : callable
        ``start_ingest(spool_dir)`` starts the ingest processes of one spool (or returns
        ``None`` for none); called once its receiving process has recovered it.
    on_failure : callable
        Called (from the supervising thread) with the reason when a receiving process keeps
        dying or cannot restart: the receiver must stop.
    """

    def __init__(
        self,
        specs: Sequence[ReceivingSpec],
        start_ingest: Callable[[Path], IngestPool | None],
        on_failure: Callable[[str], None],
    ) -> None:
        self.specs = list(specs)
        self._start_ingest = start_ingest
        self._on_failure = on_failure
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: list[Any] = [None] * len(self.specs)
        self._conns: list[Any] = [None] * len(self.specs)
        self.pools: list[IngestPool | None] = [None] * len(self.specs)
        self._deaths: list[deque[float]] = [deque() for _ in self.specs]
        self._lock = threading.RLock()  # on_failure may call stop() from the supervising thread
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: str | None = None
        self.restarts = 0

    @property
    def pids(self) -> list[int]:
        """Process ids of the receiving processes, by index (for tests and logs)."""
        return [p.pid for p in self._procs if p is not None]

    def start(self, before_listening: Callable[[], None] | None = None) -> list[RecoveryReport]:
        """Start every receiving process, each spool's ingest once it is recovered, and the supervisor.

        Parameters
        ----------
        before_listening : callable, optional
            Runs once every spool is recovered and its ingest started, before any process
            listens (the receiver starts its completeness monitor there, as a single process
            does before its SCP).

        Raises
        ------
        SpoolLockedError, ConfigError, OSError, ReceiverError
            What a receiving process raised while starting (the others are stopped).
        """
        try:
            for index in range(len(self.specs)):
                self._spawn(index)  # all at once: each spends its first seconds importing
            reports = [self._recovered(index) for index in range(len(self.specs))]
            if before_listening is not None:
                before_listening()
            for index in range(len(self.specs)):
                self._listen(index)
        except BaseException:
            self.stop()
            raise
        self._thread = threading.Thread(target=self._supervise, name="receiving-processes", daemon=True)
        self._thread.start()
        return reports

    def _spawn(self, index: int) -> None:
        ours, theirs = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_serve, args=(self.specs[index], theirs), name=f"dcmflow-scp-{index}", daemon=True
        )
        proc.start()
        theirs.close()
        self._procs[index], self._conns[index] = proc, ours

    def _recovered(self, index: int) -> RecoveryReport:
        """Wait until process ``index`` has recovered its spool; start that spool's ingest."""
        report = self._answer(index)
        self.pools[index] = self._start_ingest(self.specs[index].spool_dir)
        return report  # type: ignore[no-any-return]

    def _listen(self, index: int) -> None:
        """Let process ``index`` listen and wait until it does."""
        self._conns[index].send(_LISTEN)
        self._answer(index)  # the pipe stays open: "stop" goes through it

    def _answer(self, index: int) -> Any:
        proc, conn = self._procs[index], self._conns[index]
        try:
            if not conn.poll(READY_TIMEOUT):
                raise ReceiverError(f"receiving process {index} did not start within {READY_TIMEOUT:g} s")
            answer = conn.recv()
        except EOFError:
            proc.join(5)
            raise ReceiverError(f"receiving process {index} died while starting (exit code {proc.exitcode})") from None
        if isinstance(answer, BaseException):
            proc.join(10)
            raise answer
        return answer

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            sentinels = {p.sentinel: i for i, p in enumerate(self._procs) if p is not None}
            ready = multiprocessing.connection.wait(list(sentinels), timeout=_PARENT_POLL)
            with self._lock:
                if self._stopping.is_set():
                    return
                for sentinel in ready:
                    if not self._restart(sentinels[sentinel]):  # type: ignore[index]
                        return

    def _restart(self, index: int) -> bool:
        proc, conn = self._procs[index], self._conns[index]
        proc.join(1)
        if conn is not None:
            conn.close()
            self._conns[index] = None
        now = time.monotonic()
        deaths = self._deaths[index]
        deaths.append(now)
        while deaths and now - deaths[0] > RESTART_WINDOW:
            deaths.popleft()
        log.error(
            "receiving process %d (pid %s) died (exit code %s); restarting it",
            index,
            proc.pid,
            proc.exitcode,
        )
        pool, self.pools[index] = self.pools[index], None
        if pool is not None:
            pool.stop()  # they finish their batch; the new process recovers the spool
        reason = None
        if len(deaths) > MAX_RESTARTS:
            reason = f"receiving process {index} died {len(deaths)} times within {RESTART_WINDOW:g} s"
        else:
            try:
                self._spawn(index)
                report = self._recovered(index)
                self._listen(index)
                self.restarts += 1
                log.info(
                    "receiving process %d restarted (pid %s): %d instances to replay, %d torn records dropped",
                    index,
                    self._procs[index].pid,
                    report.pending,
                    report.dropped,
                )
            except Exception as exc:
                reason = f"receiving process {index} cannot restart: {type(exc).__name__}: {exc}"
        if reason is None:
            return True
        self.failure = reason
        log.critical("%s; stopping the receiver", reason)
        self._on_failure(reason)
        return False

    def alive(self) -> bool:
        """True while no failure was declared and every ingest process runs."""
        return self.failure is None and all(p.alive() for p in self.pools if p is not None)

    def stop(self) -> None:
        """Stop the receiving processes (no new associations; running ones end), then ingest (idempotent)."""
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            for conn in self._conns:
                if conn is not None:
                    try:
                        conn.send(_STOP)
                    except OSError:
                        pass  # that process is gone already
            for index, proc in enumerate(self._procs):
                if proc is None:
                    continue
                proc.join(30)
                if proc.is_alive():
                    log.warning("receiving process %d (pid %s) did not stop; terminating it", index, proc.pid)
                    proc.kill()
                    proc.join(5)
                self._procs[index] = None
            for conn in self._conns:
                if conn is not None:
                    conn.close()
            self._conns = [None] * len(self.specs)
            # Every spool's ingest at once: each finishes its batch.
            stoppers = [threading.Thread(target=pool.stop) for pool in self.pools if pool is not None]
            for thread in stoppers:
                thread.start()
            for thread in stoppers:
                thread.join()
            self.pools = [None] * len(self.specs)
