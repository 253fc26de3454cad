"""The ``dcmflow`` command line: one Typer app joined from one module per command group."""

from __future__ import annotations

import typer

from dcmflow import __version__
from dcmflow.cli import db, demo, doctor, importer, jobs, peers, process, receive, selfcheck, series, services, up

app = typer.Typer(
    name="dcmflow",
    help="Receive DICOM, keep it safely, and run processing services on every series as Prefect flows.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Receive DICOM, keep it safely, and run processing services on every series as Prefect flows.

    Configuration comes from DCMFLOW_* environment variables (see the README); with none set,
    everything lives under ./.dcmflow (SQLite database, local object store, spool).
    """


app.command(name="up")(up.up)
app.command(name="status")(up.status)
app.command(name="serve-flows", hidden=True)(up.serve_flows)
app.command(name="register-flows", hidden=True)(up.register_flows)
app.command(name="demo")(demo.demo)
app.command(name="receive")(receive.receive)
app.add_typer(db.app, name="db")
app.add_typer(services.app, name="services")
app.add_typer(peers.app, name="peers")
app.add_typer(series.app, name="series")
app.command(name="import")(importer.import_command)
app.command(name="process")(process.process)
app.command(name="reprocess")(process.reprocess)
app.add_typer(jobs.app, name="jobs")
app.command(name="selfcheck")(selfcheck.selfcheck)
app.command(name="doctor")(doctor.doctor)


@app.command()
def version() -> None:
    """Print the dcmflow version.

    Examples:

        dcmflow version
    """
    typer.echo(__version__)


def main() -> None:
    """Console-script entry point."""
    app()
