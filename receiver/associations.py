"""Who may send to us, and what we remember about each association while it runs.

* :class:`CallerPolicy` decides at A-ASSOCIATE-RQ time (PS3.8 §7.1) whether a caller may send:
  loopback (or any configured trusted network), configured peers (``Peer`` records with
  ``allow_send``, matched on AE title and host; over TLS only when the peer has ``tls``), or
  anyone when ``accept_any`` is set.
* :class:`AssociationTracker` gives each association an id (stored in each spool record's header), keeps
  its counters for the one log line per association, and hands open/close facts to an
  :class:`AssociationFacts` sink. The sink writes in a background thread, so a slow or
  unreachable database never delays a C-STORE response; its errors are logged and swallowed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import queue
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from receiver.errors import ConfigError
from receiver.spool import new_association_id

__all__ = [
    "DEFAULT_TRUSTED_NETWORKS",
    "PeerEntry",
    "CallerPolicy",
    "AssociationInfo",
    "AssociationFacts",
    "RepositoryFacts",
    "AssociationTracker",
    "parse_networks",
]

log = logging.getLogger("receiver")

DEFAULT_TRUSTED_NETWORKS: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
"""Callers from these networks may always send (loopback only, by default)."""

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[_Network, ...]:
    """Parse CIDR strings (``"10.0.0.0/8"``, ``"::1/128"``, a bare address = one host).

    Raises
    ------
    ConfigError
        On a value that is not an address or network.
    """
    out: list[_Network] = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as exc:
            raise ConfigError(f"not a network: {value!r} ({exc})") from exc
    return tuple(out)


@dataclass(frozen=True)
class PeerEntry:
    """A remote AE that may send to us: AE title and host (name or address; ``*`` = any host).

    ``tls``: its associations are accepted only over TLS (``Peer.tls``), so a plain-TCP caller
    using its AE title and address is refused rather than trusted.
    """

    ae_title: str
    host: str
    tls: bool = False


def _address_in(address: str, networks: Sequence[_Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


class CallerPolicy:
    """Decide whether a calling AE at an address may open an association.

    Parameters
    ----------
    accept_any : bool
        Accept every caller (an explicit setting; off by default).
    trusted_networks : sequence of str
        CIDR networks whose callers are always accepted (default: loopback).
    peers : callable, optional
        Returns the current peers allowed to send (for example from the ``Peer`` records).
        Called at most every ``refresh_seconds``; when it fails the last answer is kept.
    refresh_seconds : float
        How long a peer list is reused.
    """

    def __init__(
        self,
        *,
        accept_any: bool = False,
        trusted_networks: Sequence[str] = DEFAULT_TRUSTED_NETWORKS,
        peers: Callable[[], Iterable[PeerEntry]] | None = None,
        refresh_seconds: float = 5.0,
    ) -> None:
        self.accept_any = accept_any
        self.trusted_networks = parse_networks(trusted_networks)
        self._peers_source = peers
        self._refresh = refresh_seconds
        self._peers: tuple[PeerEntry, ...] = ()
        self._loaded_at = float("-inf")
        self._lock = threading.Lock()
        self._resolved: dict[str, tuple[float, frozenset[str]]] = {}

    def _current_peers(self) -> tuple[PeerEntry, ...]:
        if self._peers_source is None:
            return ()
        with self._lock:
            now = time.monotonic()
            if now - self._loaded_at >= self._refresh:
                try:
                    self._peers = tuple(self._peers_source())
                except Exception as exc:
                    log.warning("could not load peers (keeping %d known): %s", len(self._peers), exc)
                self._loaded_at = now
            return self._peers

    def _host_addresses(self, host: str) -> frozenset[str]:
        now = time.monotonic()
        cached = self._resolved.get(host)
        if cached and now - cached[0] < 60:
            return cached[1]
        try:
            infos = socket.getaddrinfo(host, None)
            addresses = frozenset(str(info[4][0]) for info in infos)
        except OSError:
            addresses = frozenset({host})
        self._resolved[host] = (now, addresses)
        return addresses

    def _peer_matches(self, peer: PeerEntry, calling_ae: str, address: str) -> bool:
        if peer.ae_title.strip() != calling_ae:
            return False
        host = peer.host.strip()
        if host in {"", "*"}:
            return True
        if host == address:
            return True
        return address in self._host_addresses(host)

    def allows(self, calling_ae: str, address: str, *, secure: bool = False) -> tuple[bool, str]:
        """Return ``(allowed, reason)`` for a caller.

        Parameters
        ----------
        calling_ae : str
            Calling AE title from the A-ASSOCIATE-RQ (stripped).
        address : str
            The caller's IP address.
        secure : bool
            Whether the association arrived over TLS; a peer with ``tls`` matches only then.
        """
        if self.accept_any:
            return True, "any caller accepted"
        if _address_in(address, self.trusted_networks):
            return True, "trusted network"
        needs_tls = False
        for peer in self._current_peers():
            if self._peer_matches(peer, calling_ae, address):
                if secure or not peer.tls:
                    return True, "configured peer"
                needs_tls = True
        if needs_tls:
            return False, "configured peer that must use TLS, over plain TCP"
        return False, "not a configured peer and not on a trusted network"


class AssociationFacts(Protocol):
    """Where open/close facts go (for the completeness monitor)."""

    def opened(self, association_id: str, calling_ae: str, at: dt.datetime) -> None:
        """An association was established."""

    def touched(self, association_id: str, series_uid: str, at: dt.datetime) -> None:
        """The association sent an instance of a series it had not sent before."""

    def closed(self, association_id: str, at: dt.datetime) -> None:
        """An association ended (released, aborted or connection lost)."""


class RepositoryFacts:
    """Write association facts through a repository, from a background thread.

    The C-STORE path only queues; the thread writes. A close is recorded only once the
    spool holds no more files of that association (``pending_files``), so the completeness
    monitor never sees an association as closed while its instances still wait for ingest
    (for example during an object-store outage).

    Parameters
    ----------
    repository : object
        Has ``association_opened(id, calling_ae)``, ``association_touched_series(id, uids)``
        and ``association_closed(id)`` (:class:`storage.repository.Repository`).
    pending_files : callable, optional
        ``pending_files(association_id) -> bool``: True while the spool still holds files of
        the association. ``None`` records closes at once.
    poll_seconds : float
        How often deferred closes are re-checked (only while one waits: a close delays a
        series closed by its expected count by up to this much).
    """

    def __init__(
        self,
        repository: Any,
        *,
        pending_files: Callable[[str], bool] | None = None,
        poll_seconds: float = 0.1,
    ) -> None:
        self._repository = repository
        self._pending_files = pending_files
        self._poll = poll_seconds
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue()
        self._deferred: list[str] = []
        self._thread = threading.Thread(target=self._run, name="association-facts", daemon=True)
        self._thread.start()

    def opened(self, association_id: str, calling_ae: str, at: dt.datetime) -> None:
        self._queue.put(("opened", (association_id, calling_ae, at)))

    def touched(self, association_id: str, series_uid: str, at: dt.datetime) -> None:
        self._queue.put(("touched", (association_id, series_uid, at)))

    def closed(self, association_id: str, at: dt.datetime) -> None:
        self._queue.put(("closed", (association_id, at)))

    def _write(self, kind: str, args: tuple[Any, ...]) -> None:
        try:
            if kind == "opened":
                self._repository.association_opened(args[0], calling_ae=args[1], now=args[2])
            elif kind == "touched":
                self._repository.association_touched_series(args[0], [args[1]], now=args[2])
            else:
                self._repository.association_closed(args[0])
        except Exception as exc:  # facts are best effort; association_timeout covers gaps
            log.warning("could not record association %s %s: %s", args[0][:8], kind, exc)

    def _flush_deferred(self, force: bool = False) -> None:
        still: list[str] = []
        for assoc_id in self._deferred:
            waiting = False
            if not force and self._pending_files is not None:
                try:
                    waiting = self._pending_files(assoc_id)
                except OSError:
                    waiting = True
            if waiting:
                still.append(assoc_id)
            else:
                self._write("closed", (assoc_id,))
        self._deferred = still

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._poll if self._deferred else None)
            except queue.Empty:
                self._flush_deferred()
                continue
            if item is None:
                return
            kind, args = item
            if kind == "closed":
                self._deferred.append(args[0])
                self._flush_deferred()
            else:
                self._write(kind, args)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued and stop the thread (deferred closes stay open: the
        association rows of a stopped receiver expire through ``association_timeout``)."""
        self._queue.put(None)
        self._thread.join(timeout)


@dataclass
class AssociationInfo:
    """What the receiver knows about one running association."""

    association_id: str
    calling_ae: str
    address: str
    opened_ns: int = field(default_factory=time.monotonic_ns)
    stored: int = 0
    stored_bytes: int = 0
    refused_full: int = 0
    closed: bool = False
    series: set[str] = field(default_factory=set)

    @property
    def label(self) -> str:
        """``AE@address#id8`` for log lines."""
        return f"{self.calling_ae}@{self.address}#{self.association_id[:8]}"


class AssociationTracker:
    """Per-association ids, counters and the one log line per association.

    Parameters
    ----------
    facts : AssociationFacts, optional
        Receives open/close facts; ``None`` records nothing.
    """

    def __init__(self, facts: AssociationFacts | None = None) -> None:
        self._facts = facts
        self._infos: weakref.WeakKeyDictionary[Any, AssociationInfo] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def info(self, assoc: Any) -> AssociationInfo:
        """The :class:`AssociationInfo` of a pynetdicom association (created on first use)."""
        info = self._infos.get(assoc)
        if info is not None:
            return info
        with self._lock:
            info = self._infos.get(assoc)
            if info is None:
                requestor = assoc.requestor
                calling = str(getattr(requestor, "ae_title", "") or "").strip()
                info = AssociationInfo(new_association_id(), calling, str(requestor.address))
                self._infos[assoc] = info
            return info

    def opened(self, assoc: Any) -> AssociationInfo:
        """Record an established association."""
        info = self.info(assoc)
        log.info("association %s opened", info.label)
        if self._facts is not None:
            self._facts.opened(info.association_id, info.calling_ae, dt.datetime.now(dt.UTC))
        return info

    def note_stored(self, assoc: Any, size: int, series_uid: str = "") -> None:
        """Count one spooled instance; report a series the association had not sent yet."""
        info = self.info(assoc)
        info.stored += 1
        info.stored_bytes += size
        if series_uid and series_uid not in info.series:
            info.series.add(series_uid)
            if self._facts is not None:
                self._facts.touched(info.association_id, series_uid, dt.datetime.now(dt.UTC))

    def note_refused(self, assoc: Any, reason: str) -> None:
        """Count one instance refused for lack of space (logged once per association)."""
        info = self.info(assoc)
        if info.refused_full == 0:
            log.error("association %s: answering 0xA700 Out of Resources: %s", info.label, reason)
        info.refused_full += 1

    def closed(self, assoc: Any, how: str) -> None:
        """Record the end of an association (only the first of release/abort/close counts)."""
        info = self._infos.get(assoc)
        if info is None or info.closed:
            return
        info.closed = True
        seconds = max((time.monotonic_ns() - info.opened_ns) / 1e9, 1e-9)
        log.info(
            "association %s ended (%s): %d instances, %.1f MB in %.2f s (%.0f/s)%s",
            info.label,
            how.removeprefix("EVT_").lower(),
            info.stored,
            info.stored_bytes / 1e6,
            seconds,
            info.stored / seconds,
            f", {info.refused_full} refused (spool full)" if info.refused_full else "",
        )
        if self._facts is not None:
            self._facts.closed(info.association_id, dt.datetime.now(dt.UTC))
