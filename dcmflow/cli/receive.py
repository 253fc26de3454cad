"""``dcmflow receive``: run the DICOM receiver (SCP + ingest workers) in the foreground.

Wiring in ``dcmflow/cli/__init__.py``::

    from dcmflow.cli import receive
    app.command(name="receive")(receive.receive)

It can also run on its own: ``python -m dcmflow.cli.receive --port 11112``.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from dcmflow.cli._common import load_settings, open_repository
from dcmflow.cli._output import fail

if TYPE_CHECKING:
    from receiver.runner import ReceiverConfig
    from storage.objects import ObjectStore
    from storage.repository import Repository

    from dcmflow.settings import Settings

__all__ = ["receive", "receiver_config", "configure_logging", "open_storage", "app"]

app = typer.Typer(help="Run the DICOM receiver.", pretty_exceptions_enable=False, add_completion=False)


def open_storage(settings: Settings) -> tuple[ObjectStore, Repository]:
    """Object store and repository from settings (module-level so ingest processes can unpickle it)."""
    from dcmflow.wiring import object_store_from, repository_from

    return object_store_from(settings), repository_from(settings)


def receiver_config(
    settings: Settings,
    *,
    port: int | None = None,
    ae_title: str | None = None,
    host: str = "",
    accept_any: bool = False,
    trusted_networks: list[str] | None = None,
    check_called_aet: bool = True,
    ingest_workers: int = 1,
    processes: int | None = None,
    min_free_mb: int | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> ReceiverConfig:
    """The receiver of ``settings``, with command-line overrides (``receive`` and ``up``).

    Receiving processes: ``processes``, else ``DCMFLOW_RECEIVER_PROCESSES``, whose 0 means
    min(2, cores) (measured in bench/ingest/README.md).
    """
    from receiver.runner import ReceiverConfig
    from receiver.scp import ScpConfig

    return ReceiverConfig(
        scp=ScpConfig(
            ae_title=ae_title or settings.ae_title,
            host=host,
            port=settings.dicom_port if port is None else port,
            require_called_aet=settings.require_called_aet and check_called_aet,
            tls_cert=tls_cert or settings.tls_cert,
            tls_key=tls_key or settings.tls_key,
        ),
        spool_dir=settings.spool_dir,
        min_free_bytes=min_free_mb * 1024 * 1024 if min_free_mb is not None else settings.spool_min_free_bytes,
        min_free_fraction=0.0 if min_free_mb is not None else settings.spool_min_free_fraction,
        accept_any=accept_any or settings.accept_any_caller,
        trusted_networks=tuple(trusted_networks or settings.trusted_networks),
        ingest_workers=ingest_workers,
        processes=processes or settings.receiver_processes or min(2, os.cpu_count() or 1),
        stable_age=settings.stable_age,
    )


def configure_logging(verbose: bool) -> None:
    """One log line format for the long-running commands; quiet the chatty libraries."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


@app.command()
def receive(
    port: int | None = typer.Option(None, "--port", "-p", help="TCP port (default DCMFLOW_DICOM_PORT, 11112)."),
    ae_title: str | None = typer.Option(None, "--ae-title", "-a", help="Our AE title (default DCMFLOW_AE_TITLE)."),
    host: str = typer.Option("", "--host", help="Bind address (default: all interfaces)."),
    accept_any: bool = typer.Option(False, "--accept-any", help="Accept associations from any caller."),
    trusted_network: list[str] = typer.Option(
        [], "--trusted-network", help="CIDR whose callers are always accepted (repeatable; default loopback)."
    ),
    no_called_aet_check: bool = typer.Option(
        False, "--no-called-aet-check", help="Accept any Called AE Title (checked by default)."
    ),
    ingest_workers: int = typer.Option(1, "--ingest-workers", "-w", min=1, help="Ingest worker processes."),
    min_free_mb: int | None = typer.Option(
        None, "--min-free-mb", min=0, help="Answer 0xA700 when less than this many MB stay free in the spool."
    ),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", help="PEM certificate chain: enables TLS (default DCMFLOW_TLS_CERT)."
    ),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="PEM private key for --tls-cert (default DCMFLOW_TLS_KEY)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Receive DICOM (C-STORE, C-ECHO) until SIGINT/SIGTERM: one log line per association and batch.

    Examples:

        dcmflow receive

        dcmflow receive --port 104 --ae-title ARCHIVE --trusted-network 10.0.0.0/24

        dcmflow receive --tls-cert cert.pem --tls-key key.pem
    """
    from receiver.errors import ReceiverError
    from receiver.runner import Receiver
    from storage.errors import StorageError

    settings = load_settings()
    configure_logging(verbose)

    repository = open_repository(settings)
    config = receiver_config(
        settings,
        port=port,
        ae_title=ae_title,
        host=host,
        accept_any=accept_any,
        trusted_networks=trusted_network,
        check_called_aet=not no_called_aet_check,
        ingest_workers=ingest_workers,
        min_free_mb=min_free_mb,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    try:
        Receiver(config, functools.partial(open_storage, settings), repository).serve_forever()
    except (ReceiverError, StorageError, OSError) as exc:
        fail(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    app()
