"""Run a whole receiver: spool recovery, ingest worker processes and the SCP, and stop them cleanly.

Start order (so nothing acknowledged can be lost or processed twice at once):

1. take the spool lock (one receiver per spool) and :meth:`~receiver.spool.Spool.recover`
   (find the end of the log, drop a torn tail record that was never acknowledged, set the read
   marks for this many ingest workers; pending records are replayed by ingest);
2. start the ingest processes (spawned before any SCP thread exists);
3. start the SCP;
4. start the completeness monitor (:class:`~receiver.completeness.CompletenessMonitor` with a
   :class:`~receiver.events.PrefectEmitter`), which declares series and studies stable in the
   database and emits their events. Without a Prefect API URL the emitter warns once and
   refuses every event, so nothing is marked emitted and the recovery step sends the events
   once the receiver is restarted with ``PREFECT_API_URL`` set.

Stop order: completeness monitor (after its current tick; then the emitter is closed), SCP
(no new associations; running ones end), association facts, then ingest workers finish their
current batch; what is left stays in the spool for the next start.

With ``processes > 1`` (``DCMFLOW_RECEIVER_PROCESSES``) steps 1 and 3 run in that many
receiving processes sharing the port (``SO_REUSEPORT``), each with its own spool
(:mod:`receiver.spools`) and association facts, supervised by
:class:`~receiver.processes.ReceivingProcesses` (a process that dies is restarted after its
spool's ingest stopped; one that keeps dying stops the receiver); this process keeps the port
reserved, the ingest processes of every spool and the completeness monitor.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from receiver.associations import (
    DEFAULT_TRUSTED_NETWORKS,
    AssociationTracker,
    CallerPolicy,
    PeerEntry,
    RepositoryFacts,
)
from receiver.completeness import CompletenessMonitor, MonitorOptions
from receiver.errors import ReceiverError
from receiver.ingest import IngestOptions, IngestPool, StorageFactory, start_ingest_processes
from receiver.processes import ReceivingProcesses, ReceivingSpec
from receiver.reuseport import reserve_port
from receiver.scp import ScpConfig, start_scp
from receiver.spool import DEFAULT_MIN_FREE_BYTES, DEFAULT_MIN_FREE_FRACTION, DEFAULT_SEGMENT_SIZE, Spool
from receiver.spools import spool_root, waiting_count

if TYPE_CHECKING:
    import socket

    from pynetdicom.transport import ThreadedAssociationServer

    from receiver.events import PrefectEmitter
    from storage.repository import Repository

__all__ = ["ReceiverConfig", "Receiver"]

log = logging.getLogger("receiver")


@dataclass(frozen=True, kw_only=True)
class ReceiverConfig:
    """Everything a receiver needs besides storage (built from Settings at the entry point).

    Attributes
    ----------
    scp : ScpConfig
        AE title, bind address and port, called-AE check, limits, TLS.
    spool_dir : Path
        The spool folder.
    min_free_bytes, min_free_fraction
        Spool disk watermark (0xA700 below it).
    segment_size : int
        Bytes per spool log segment.
    accept_any : bool
        Accept associations from any caller.
    trusted_networks : sequence of str
        Callers from these CIDR networks are always accepted (default loopback).
    ingest_workers : int
        Number of ingest processes (per spool).
    processes : int
        Receiving processes sharing the port, each with its own spool (1: the SCP runs in
        this process).
    ingest : IngestOptions
        Batch tuning.
    stable_age : float
        Quiet period in seconds before a series is stable (``Settings.stable_age``; peers
        may override it).
    completeness : bool
        Run the completeness monitor (needs a repository); False only for tests and
        benchmarks that check stability themselves.
    monitor_interval : float
        Seconds between ticks of the completeness monitor.
    """

    scp: ScpConfig = field(default_factory=ScpConfig)
    spool_dir: Path
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES
    min_free_fraction: float = DEFAULT_MIN_FREE_FRACTION
    segment_size: int = DEFAULT_SEGMENT_SIZE
    accept_any: bool = False
    trusted_networks: Sequence[str] = DEFAULT_TRUSTED_NETWORKS
    ingest_workers: int = 1
    processes: int = 1
    ingest: IngestOptions = field(default_factory=IngestOptions)
    stable_age: float
    completeness: bool = True
    monitor_interval: float = MonitorOptions.interval


def _peers_of(repository: Repository) -> Callable[[], list[PeerEntry]]:
    def load() -> list[PeerEntry]:
        return [PeerEntry(p.ae_title, p.host, p.tls) for p in repository.list_peers() if p.allow_send]

    return load


class Receiver:
    """A running receiver (SCP + ingest processes) in this process.

    Parameters
    ----------
    config : ReceiverConfig
        What to run.
    storage : StorageFactory
        Picklable; opens ``(ObjectStore, Repository)`` in each ingest process.
    repository : Repository, optional
        Used here for peers and association facts; ``None`` means peers are unknown (only
        trusted networks or ``accept_any``) and no facts are recorded.
    """

    def __init__(self, config: ReceiverConfig, storage: StorageFactory, repository: Any = None) -> None:
        self.config = config
        self.storage = storage
        self.repository = repository
        self.spool = Spool(
            config.spool_dir,
            min_free_bytes=config.min_free_bytes,
            min_free_fraction=config.min_free_fraction,
            segment_size=config.segment_size,
        )
        self.facts: RepositoryFacts | None = None
        self.pool: IngestPool | None = None
        self.server: ThreadedAssociationServer | None = None
        self.monitor: CompletenessMonitor | None = None
        self.emitter: PrefectEmitter | None = None
        self.processes: ReceivingProcesses | None = None
        self._reservation: socket.socket | None = None
        self._stop_requested = False
        self._serving = False
        self.failure: str | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._reservation is not None:
            return int(self._reservation.getsockname()[1])
        assert self.server is not None
        return int(self.server.server_address[1])

    def start(self, *, log_level: int = logging.INFO) -> None:
        """Recover the spool, start ingest processes and the completeness monitor, then the SCP.

        Raises
        ------
        SpoolLockedError
            If another receiver uses the spool.
        ConfigError, OSError
            On bad TLS files or a port that cannot be bound.
        """
        cfg = self.config
        count = max(cfg.processes, waiting_count(cfg.spool_dir))
        if count > 1:
            self._start_processes(count, log_level)
        else:
            self._start_here(log_level)
        log.info(
            "receiving as %s on %s:%d (%s); spool %s; %d receiving process%s; %d ingest process%s",
            cfg.scp.ae_title,
            cfg.scp.host or "*",
            self.port,
            "any caller" if cfg.accept_any else f"trusted {', '.join(cfg.trusted_networks)} + peers",
            self.spool.root,
            count,
            "" if count == 1 else "es",
            cfg.ingest_workers * count,
            "" if cfg.ingest_workers * count == 1 else "es",
        )

    @staticmethod
    def _log_recovery(root: Path, found: Any) -> None:
        if found.pending or found.dropped:
            log.info(
                "spool %s: %d instances (%.1f MB) to replay, %d torn records dropped",
                root,
                found.pending,
                found.pending_bytes / 1e6,
                found.dropped,
            )

    def _start_processes(self, count: int, log_level: int) -> None:
        """Reserve the port, then start ``count`` receiving processes, each spool's ingest, the monitor."""
        cfg = self.config
        self._reservation = reserve_port(cfg.scp.host, cfg.scp.port)
        scp = replace(cfg.scp, port=self.port, reuse_port=True)
        specs = [
            ReceivingSpec(
                index=index,
                spool_dir=spool_root(cfg.spool_dir, index),
                scp=scp,
                min_free_bytes=cfg.min_free_bytes,
                min_free_fraction=cfg.min_free_fraction,
                segment_size=cfg.segment_size,
                ingest_workers=cfg.ingest_workers,
                accept_any=cfg.accept_any,
                trusted_networks=tuple(cfg.trusted_networks),
                storage=self.storage if self.repository is not None else None,
                log_level=log_level,
            )
            for index in range(count)
        ]

        def start_ingest(root: Path) -> IngestPool | None:
            if cfg.ingest_workers < 1:
                return None
            return start_ingest_processes(self.storage, root, cfg.ingest_workers, options=cfg.ingest, log_level=log_level)

        def start_monitor() -> None:
            if cfg.completeness and self.repository is not None:
                self._start_monitor()

        self.processes = ReceivingProcesses(specs, start_ingest, self._fail)
        try:
            for spec, found in zip(specs, self.processes.start(before_listening=start_monitor), strict=True):
                self._log_recovery(spec.spool_dir, found)
        except BaseException:
            self.stop()
            raise

    def _fail(self, reason: str) -> None:
        """A receiving process keeps dying: stop the receiver (``serve_forever`` returns, or SIGTERM)."""
        self.failure = reason
        self._stop_requested = True
        if not self._serving:  # e.g. inside ``dcmflow up``: stop it as Ctrl-C/SIGTERM would
            os.kill(os.getpid(), signal.SIGTERM)

    def _start_here(self, log_level: int) -> None:
        """The SCP in this process, on spool 0 (the layout before several processes existed)."""
        cfg = self.config
        self._log_recovery(self.spool.root, self.spool.recover(max(cfg.ingest_workers, 1)))
        if cfg.ingest_workers > 0:
            self.pool = start_ingest_processes(
                self.storage, cfg.spool_dir, cfg.ingest_workers, options=cfg.ingest, log_level=log_level
            )
        peers = _peers_of(self.repository) if self.repository is not None else None
        if self.repository is not None:
            self.facts = RepositoryFacts(self.repository, pending_files=self.spool.has_files_of)
        policy = CallerPolicy(accept_any=cfg.accept_any, trusted_networks=cfg.trusted_networks, peers=peers)
        tracker = AssociationTracker(self.facts)
        try:
            # The monitor first: building its emitter imports Prefect (seconds of CPU), which
            # must not compete for the GIL with the first associations.
            if cfg.completeness and self.repository is not None:
                self._start_monitor()
            self.server = start_scp(cfg.scp, self.spool, tracker, policy)
        except BaseException:
            self.stop()
            raise

    def _start_monitor(self) -> None:
        from receiver.events import PrefectEmitter  # imports Prefect: only when monitoring

        cfg = self.config
        self.emitter = PrefectEmitter()  # without an API URL it warns once: events are off
        if self.emitter.enabled:
            log.info("events: %s", self.emitter.api_url)
        self.monitor = CompletenessMonitor(
            self.repository, self.emitter, MonitorOptions(stable_age=cfg.stable_age, interval=cfg.monitor_interval)
        )
        self.monitor.start()

    def stop(self) -> None:
        """Stop the monitor (closing its emitter), the SCP, flush facts, stop ingest (idempotent)."""
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        if self.emitter is not None:
            self.emitter.close()
            self.emitter = None
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        if self.processes is not None:
            self.processes.stop()  # receiving processes, then the ingest of every spool
            self.processes = None
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None
        if self.facts is not None:
            self.facts.close()
            self.facts = None
        if self.pool is not None:
            self.pool.stop()
            self.pool = None
        self.spool.unlock()

    def request_stop(self, *_: Any) -> None:
        """Ask :meth:`serve_forever` to return.

        Safe from a signal handler: it only sets a flag (no lock is taken, so it cannot
        deadlock against the main thread it interrupts).
        """
        self._stop_requested = True

    def serve_forever(self) -> None:
        """Start, wait for SIGINT/SIGTERM (or :meth:`request_stop`), then stop cleanly.

        Raises
        ------
        ReceiverError
            After stopping, when a receiving process kept dying (:attr:`failure`).
        """
        previous = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        self._serving = True
        try:
            self.start()
            while not self._stop_requested:
                time.sleep(0.2)  # interrupted by signals; the handler runs here
                if (self.pool is not None and not self.pool.alive()) or (
                    self.processes is not None and self.processes.failure is None and not self.processes.alive()
                ):
                    log.error("an ingest process died; stopping the receiver")
                    break
            log.info("stopping")
        finally:
            self._serving = False
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.failure is not None:
            raise ReceiverError(self.failure)
