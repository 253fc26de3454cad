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
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
from receiver.ingest import IngestOptions, IngestPool, StorageFactory, start_ingest_processes
from receiver.scp import ScpConfig, start_scp
from receiver.spool import DEFAULT_MIN_FREE_BYTES, DEFAULT_MIN_FREE_FRACTION, DEFAULT_SEGMENT_SIZE, Spool

if TYPE_CHECKING:
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
        Number of ingest processes.
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
        self._stop_requested = False

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
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
        found = self.spool.recover(max(cfg.ingest_workers, 1))
        if found.pending or found.dropped:
            log.info(
                "spool %s: %d instances (%.1f MB) to replay, %d torn records dropped",
                self.spool.root,
                found.pending,
                found.pending_bytes / 1e6,
                found.dropped,
            )
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
        log.info(
            "receiving as %s on %s:%d (%s); spool %s; %d ingest process%s",
            cfg.scp.ae_title,
            cfg.scp.host or "*",
            self.port,
            "any caller" if cfg.accept_any else f"trusted {', '.join(cfg.trusted_networks)} + peers",
            self.spool.root,
            cfg.ingest_workers,
            "" if cfg.ingest_workers == 1 else "es",
        )

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
        """Start, wait for SIGINT/SIGTERM (or :meth:`request_stop`), then stop cleanly."""
        previous = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            while not self._stop_requested:
                time.sleep(0.2)  # interrupted by signals; the handler runs here
                if self.pool is not None and not self.pool.alive():
                    log.error("an ingest process died; stopping the receiver")
                    break
            log.info("stopping")
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
