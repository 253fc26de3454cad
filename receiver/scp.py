"""Build and start the DICOM Storage SCP (pynetdicom) from plain configuration values.

Wiring only: the behaviour lives in :mod:`receiver.handlers`. The AE accepts every storage SOP
class (PS3.4 Annex B.5, plus private and not-yet-known ones) with whatever transfer syntax the
sender proposes first (uncompressed, deflated, JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE, MPEG…), so
instances are stored exactly as the sender encoded them, plus Verification (C-ECHO). Handlers are bound as ``(event, handler, [deps])`` tuples.

Quick start::

    from receiver.scp import ScpConfig, start_scp
    from receiver.spool import Spool
    from receiver.associations import AssociationTracker, CallerPolicy

    server = start_scp(ScpConfig(ae_title="DCMFLOW", port=11112), Spool(path),
                       AssociationTracker(), CallerPolicy())
    ...
    server.shutdown()
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from receiver._tuning import (
    DEFAULT_REACTOR_DELAY,
    set_pynetdicom_event_logging,
    shorten_reactor_sleeps,
)
from receiver.errors import ConfigError
from receiver.handlers import (
    handle_closed,
    handle_echo,
    handle_established,
    handle_requested,
    handle_store,
)
from receiver.reuseport import ReusePortAE
from receiver.transfer import attach

if TYPE_CHECKING:
    from pynetdicom.transport import ThreadedAssociationServer

    from receiver.associations import AssociationTracker, CallerPolicy
    from receiver.spool import Spool

__all__ = ["DEFAULT_MAXIMUM_ASSOCIATIONS", "ScpConfig", "build_ae", "start_scp", "tls_context"]

DEFAULT_MAXIMUM_ASSOCIATIONS = 32
"""Concurrent inbound associations (pynetdicom's default is 10); more get A-ASSOCIATE-RJ
transient / local limit exceeded (PS3.8 Table 9-21)."""


@dataclass(frozen=True, kw_only=True)
class ScpConfig:
    """Listening parameters of the SCP (values come from Settings and the command line).

    Attributes
    ----------
    ae_title : str
        Our AE title (PS3.5 §6.2: at most 16 characters).
    host : str
        Bind address (``""`` = all interfaces).
    port : int
        TCP port.
    require_called_aet : bool
        Reject associations whose Called AE Title is not ours (PS3.8 Table 9-21 reason 7).
    maximum_associations : int
        Concurrent inbound associations.
    tls_cert, tls_key : Path, optional
        PEM certificate chain and key; both set = TLS (PS3.15 B.1 Secure Transport).
    tls_ca : Path, optional
        CA bundle: when set, callers must present a certificate it signed.
    reactor_delay : float, optional
        Poll interval of pynetdicom's reactors in this process (see :mod:`receiver._tuning`);
        ``None`` keeps pynetdicom's 1 ms.
    pynetdicom_event_logs : bool
        Keep pynetdicom's per-DIMSE-message standard log handlers (off: they cost CPU per
        message; the receiver logs one line per association).
    unrestricted_storage : bool
        Accept any storage/private/unknown SOP class with any transfer syntax (see
        :func:`build_ae`).
    fast_transfer : bool
        Once pynetdicom has negotiated an association, run its data phase (C-STORE, C-ECHO,
        release, abort) in :mod:`receiver.transfer`'s single loop instead of pynetdicom's two
        polling threads (same responses, byte for byte; several times less CPU per message).
    reuse_port : bool
        Listen with ``SO_REUSEPORT`` so several receiving processes share the port
        (:mod:`receiver.reuseport`).
    """

    ae_title: str = "DCMFLOW"
    host: str = ""
    port: int = 11112
    require_called_aet: bool = True
    maximum_associations: int = DEFAULT_MAXIMUM_ASSOCIATIONS
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    reactor_delay: float | None = DEFAULT_REACTOR_DELAY
    pynetdicom_event_logs: bool = False
    unrestricted_storage: bool = True
    fast_transfer: bool = True
    reuse_port: bool = False


def tls_context(config: ScpConfig) -> ssl.SSLContext | None:
    """A server TLS context from the configured PEM files, or ``None`` when TLS is off.

    Raises
    ------
    ConfigError
        If only one of cert/key is set or the files cannot be loaded.
    """
    if config.tls_cert is None and config.tls_key is None:
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ConfigError("TLS needs both a certificate and a key")
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
        if config.tls_ca is not None:
            context.load_verify_locations(str(config.tls_ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS files: {exc}") from exc
    return context


def build_ae(config: ScpConfig) -> AE:
    """An :class:`~pynetdicom.ae.ApplicationEntity` configured as our Storage SCP.

    With ``config.unrestricted_storage`` (the default) pynetdicom's
    ``_config.UNRESTRICTED_STORAGE_SERVICE`` is switched on: every proposed storage, private or
    unknown SOP class is accepted with the first transfer syntax proposed for it, so new SOP
    classes and any transfer syntax are stored as received, and only Verification needs a
    supported context. (Listing 170 storage classes × all transfer syntaxes instead costs a
    deep copy of ~6000 objects per association: ~0.25 s of CPU, profiled.) Otherwise every
    storage class pynetdicom knows is listed with ``ALL_TRANSFER_SYNTAXES``.

    ``maximum_pdu_size = 0`` (no limit) lets the sender use its largest PDUs; the timeouts are
    pynetdicom's defaults.
    """
    from pynetdicom import _config

    ae = (ReusePortAE if config.reuse_port else AE)(ae_title=config.ae_title)
    _config.UNRESTRICTED_STORAGE_SERVICE = config.unrestricted_storage
    if not config.unrestricted_storage:
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)  # type: ignore[arg-type]
    ae.add_supported_context(Verification)
    ae.maximum_pdu_size = 0
    ae.maximum_associations = config.maximum_associations
    ae.require_called_aet = config.require_called_aet
    return ae


def start_scp(
    config: ScpConfig,
    spool: Spool,
    tracker: AssociationTracker,
    policy: CallerPolicy,
) -> ThreadedAssociationServer:
    """Start listening in background threads and return the server (call ``.shutdown()``).

    Parameters
    ----------
    config : ScpConfig
        Address, AE title, limits, TLS.
    spool : Spool
        Where acknowledged instances are written.
    tracker : AssociationTracker
        Association ids, counters and open/close facts.
    policy : CallerPolicy
        Who may send.

    Raises
    ------
    ConfigError
        On bad TLS files.
    OSError
        If the port cannot be bound.
    """
    ae = build_ae(config)
    if config.reactor_delay is not None:
        shorten_reactor_sleeps(config.reactor_delay)
    set_pynetdicom_event_logging(config.pynetdicom_event_logs)
    handlers = [
        (evt.EVT_REQUESTED, handle_requested, [policy, tracker]),
        *([(evt.EVT_REQUESTED, attach, [spool, tracker])] if config.fast_transfer else []),
        (evt.EVT_ESTABLISHED, handle_established, [tracker]),
        (evt.EVT_C_STORE, handle_store, [spool, tracker]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_RELEASED, handle_closed, [tracker]),
        (evt.EVT_ABORTED, handle_closed, [tracker]),
        (evt.EVT_CONN_CLOSE, handle_closed, [tracker]),
    ]
    server = ae.start_server(
        (config.host, config.port),
        block=False,
        evt_handlers=handlers,  # type: ignore[arg-type]
        ssl_context=tls_context(config),
    )
    assert server is not None  # block=False always returns the server
    return server
