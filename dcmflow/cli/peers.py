"""``dcmflow peers``: the DICOM AEs dcmflow exchanges images with.

A peer is a modality or PACS that may send to us (``--allow-send``, on by default: the
receiver accepts associations from loopback, trusted networks and the peers' AE titles at
their hosts) and, or, one we send to: results (``--receive-results``) or series the
``forward`` service routes to it by name. ``dcmflow peers echo NAME`` checks the way there
with a C-ECHO (PS3.7 9.1.5), the first thing to try when a PACS "cannot reach" us or we it.
"""

from __future__ import annotations

import time

import typer

from dcmflow.cli._common import load_settings, open_repository
from dcmflow.cli._output import emit, emit_one, fail, info

__all__ = ["app"]

app = typer.Typer(help="DICOM peers: modalities and PACS that send to us or that we send to.", no_args_is_help=True)

_COLUMNS = ["name", "ae_title", "host", "port", "allow_send", "receive_results", "tls", "description"]


@app.command("add")
def add_peer(
    name: str = typer.Argument(..., help="Short name you refer to it by (forward rules, send destinations)."),
    ae_title: str = typer.Argument(..., help="Its AE title (1-16 characters)."),
    host: str = typer.Argument(..., help="Its host name or IP address."),
    port: int = typer.Argument(..., min=1, max=65535, help="Its DICOM port."),
    allow_send: bool = typer.Option(True, "--allow-send/--no-allow-send", help="Accept associations from it."),
    receive_results: bool = typer.Option(False, "--receive-results", help="Send job results to it."),
    tls: bool = typer.Option(False, "--tls", help="TLS only, both ways (DCMFLOW_TLS_* settings)."),
    description: str = typer.Option("", "--description", "-d", help="Free text shown in listings."),
) -> None:
    """Add a peer, or replace the one with this name.

    Examples:

        dcmflow peers add PACS ORTHANC pacs.example.org 4242 --receive-results

        dcmflow peers add CT1 CT_SCANNER_1 10.0.0.21 104 -d "CT, room 3"
    """
    from storage.models import PeerBase

    title = ae_title.strip()
    if not title or len(title) > 16 or "\\" in title or not title.isprintable():
        fail(f"AE title {ae_title!r}: 1-16 printable characters, no backslash (PS3.5 6.2 AE)")
    peer = PeerBase(
        name=name, ae_title=title, host=host, port=port, allow_send=allow_send,
        receive_results=receive_results, tls=tls, description=description,
    )
    repository = open_repository(load_settings())
    saved = repository.upsert_peer(peer)
    info(f"peer {saved.name}: {saved.ae_title} at {saved.host}:{saved.port}")


@app.command("list")
def list_peers(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the peers.

    Examples:

        dcmflow peers list --json
    """
    repository = open_repository(load_settings())
    emit(repository.list_peers(), as_json, columns=_COLUMNS, title="Peers")


@app.command("remove")
def remove_peer(name: str = typer.Argument(..., help="Peer name.")) -> None:
    """Remove a peer (it may no longer send to us, and nothing is sent to it).

    Examples:

        dcmflow peers remove CT1
    """
    repository = open_repository(load_settings())
    if not repository.remove_peer(name):
        fail(f"no peer named {name!r}; see `dcmflow peers list`")
    info(f"removed peer {name}")


@app.command("echo")
def echo_peer(
    name: str = typer.Argument(..., help="Peer name."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds to wait for the association and the answer."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """C-ECHO a peer with our AE title: can we reach it, does it accept us?

    Examples:

        dcmflow peers echo PACS
    """
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from tasks.send import client_tls_context

    settings = load_settings()
    peer = open_repository(settings).get_peer(name)
    if peer is None:
        fail(f"no peer named {name!r}; see `dcmflow peers list`")
    ae = AE(ae_title=settings.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    tls_args = None
    if peer.tls:
        tls_args = (client_tls_context(settings.tls_cert, settings.tls_key, settings.tls_ca), peer.host)
    started = time.perf_counter()
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        why = (
            f"rejected us (does it know calling AE {settings.ae_title!r}, called AE {peer.ae_title!r}?)"
            if assoc.is_rejected
            else "not established: nothing answered there, or it aborted"
        )
        fail(f"C-ECHO to {peer.ae_title} at {peer.host}:{peer.port}: association {why}")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    elapsed = time.perf_counter() - started
    code = int(status.Status) if status and "Status" in status else None
    if code != 0x0000:
        fail(f"C-ECHO to {peer.ae_title}: status {code if code is None else hex(code)}")
    emit_one({"peer": peer.name, "ae_title": peer.ae_title, "host": peer.host, "port": peer.port,
              "status": "Success", "seconds": round(elapsed, 3)}, as_json, title="C-ECHO")
