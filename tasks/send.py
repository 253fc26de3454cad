"""Send output files to a DICOM peer with C-STORE (PS3.4 Annex B), retrying on failure.

One association per attempt carries every file; presentation contexts are proposed per SOP
class with the file's own transfer syntax (plus Explicit/Implicit VR Little Endian, which
every SCP accepts, PS3.5 §10.1). A file whose status is not Success (0x0000) or a Warning
(0xB000, 0xB007, 0xB006, PS3.4 B.2.3) is retried on the next attempt; after the last attempt
:class:`tasks.errors.SendError` names what is still unsent. A peer marked ``tls`` is sent to
only over TLS (PS3.15 B.1), its certificate verified (:func:`client_tls_context`); never in
clear.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_incrementing

from tasks.errors import SendError

if TYPE_CHECKING:
    from storage.models import PeerPublic

__all__ = ["SendReport", "client_tls_context", "dicom_files", "send_files"]

_OK_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


@dataclass
class SendReport:
    """What a send did: files sent (SOP Instance UIDs), attempts used, last error."""

    peer: str
    sent: list[str] = field(default_factory=list)
    attempts: int = 0
    error: str | None = None


def dicom_files(path: Path) -> list[Path]:
    """``path`` itself, or every DICOM file under it (PS3.10 §7.1 ``DICM`` preamble check)."""
    candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    found = []
    for candidate in candidates:
        with candidate.open("rb") as fh:
            if fh.read(132)[128:] == b"DICM":
                found.append(candidate)
    return found


def client_tls_context(cert: Path | None = None, key: Path | None = None, ca: Path | None = None) -> ssl.SSLContext:
    """TLS client context for peers marked ``tls``: their certificate and host name verified.

    Parameters
    ----------
    cert, key : Path, optional
        Our PEM certificate chain and key, shown to peers that ask for a client certificate.
    ca : Path, optional
        PEM bundle the peer's certificate must chain to; the system's CAs when omitted.

    Raises
    ------
    SendError
        If a file cannot be loaded (one line, naming it).
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
        if cert is not None:
            context.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        raise SendError(f"TLS settings unusable (DCMFLOW_TLS_CERT/KEY/CA): {exc}") from None
    return context


def _attempt(
    peer: PeerPublic,
    calling_ae: str,
    datasets: dict[str, pydicom.Dataset],
    timeout: float,
    tls: ssl.SSLContext | None,
) -> tuple[list[str], str | None]:
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts: dict[str, set[str]] = {}
    for ds in datasets.values():
        syntaxes = contexts.setdefault(str(ds.SOPClassUID), {ExplicitVRLittleEndian, ImplicitVRLittleEndian})
        syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, sorted(syntaxes))
    tls_args = None
    if peer.tls:
        assert tls is not None, "send_files supplies the context of a tls peer"  # never fall back to clear
        tls_args = (tls, peer.host)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        over = " over TLS" if tls_args else ""
        return [], f"association with {peer.ae_title}@{peer.host}:{peer.port}{over} not established"
    sent, error = [], None
    try:
        for sop_uid, ds in datasets.items():
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code in _OK_STATUSES:
                sent.append(sop_uid)
            else:
                error = f"C-STORE of {sop_uid} returned status {'none' if code is None else hex(code)}"
    finally:
        assoc.release()
    return sent, error


class _Unsent(Exception):
    """Some files are still unsent after one attempt: tenacity tries again."""


def send_files(
    peer: PeerPublic,
    files: Sequence[Path],
    *,
    calling_ae: str = "DCMFLOW",
    attempts: int = 3,
    delay: float = 1.0,
    timeout: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> SendReport:
    """C-STORE ``files`` to ``peer``, retrying what failed (tenacity: ``attempts`` tries,
    ``delay`` × the attempt number between them).

    ``tls`` is the client context for a peer marked ``tls`` (:func:`client_tls_context`); the
    system's default verification when omitted. Peers without the mark get plain TCP.

    Raises
    ------
    SendError
        A file is not DICOM, or something is still unsent after ``attempts`` tries.
    """
    if peer.tls and tls is None:
        tls = client_tls_context()
    pending: dict[str, pydicom.Dataset] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError) as exc:
            raise SendError(f"{path.name}: not a DICOM file: {exc}") from None
        pending[str(ds.SOPInstanceUID)] = ds
    report = SendReport(peer=peer.name)
    retrying = Retrying(
        stop=stop_after_attempt(attempts),
        wait=wait_incrementing(start=delay, increment=delay),  # delay, 2 × delay, …
        retry=retry_if_exception_type(_Unsent),
        reraise=True,
    )
    try:
        for attempt in retrying:
            with attempt:  # one association; what was stored leaves ``pending``
                report.attempts = attempt.retry_state.attempt_number
                try:
                    sent, error = _attempt(peer, calling_ae, pending, timeout, tls)
                except Exception as exc:  # noqa: BLE001 - network errors of any kind: retry
                    sent, error = [], f"{type(exc).__name__}: {exc}"
                for uid in sent:
                    pending.pop(uid, None)
                    report.sent.append(uid)
                report.error = error if pending else None
                if pending:
                    raise _Unsent(error)
    except _Unsent:
        raise SendError(
            f"{len(pending)} file(s) not sent to peer {peer.name!r} after {attempts} attempts: {report.error}"
        ) from None
    return report

