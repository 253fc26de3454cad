"""``dcmflow import PATH... [--watch]``: import DICOM files and folders like received instances.

Wiring in ``dcmflow/cli/__init__.py``::

    from dcmflow.cli import importer
    app.command(name="import")(importer.import_command)
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import typer

from dcmflow.cli._common import load_settings, open_repository
from dcmflow.cli._output import fail, info, stderr

__all__ = ["import_command"]


def import_command(
    paths: list[Path] = typer.Argument(..., help="Files and folders (folders are imported recursively)."),
    watch: bool = typer.Option(
        False,
        "--watch",
        help="Keep following the folder(s): import each finished sub-folder once; names with a .tmp* "
        "extension are still being written and wait until renamed.",
    ),
    interval: float = typer.Option(2.0, "--interval", min=0.1, help="Seconds between polls with --watch."),
    source: str = typer.Option("IMPORT", "--source", help="Calling AE recorded for the imported instances."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Import DICOM files and folders (recursively): progress on stderr, one summary line on stdout.

    Files that are not DICOM are listed (one line each on stderr) and counted; they do not stop
    the import. Re-importing the same files records nothing new (duplicates).

    Examples:

        dcmflow import /media/cdrom/DICOM

        dcmflow import study1/ study2/ --source CD-IMPORT

        dcmflow import --watch /srv/incoming --interval 5
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from receiver.errors import ReceiverError
    from receiver.importer import ImportReport, Importer, Skipped, iter_files
    from receiver.watch import FolderWatcher, ledger_path_for
    from storage.errors import StorageError

    from dcmflow.wiring import object_store_from

    settings = load_settings()
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        fail(f"no such file or folder: {', '.join(missing)}")
    if watch and not all(p.is_dir() for p in paths):
        fail("--watch follows folders; give folder paths")
    logging.getLogger("receiver.importer").setLevel(logging.ERROR)  # skipped files are printed below
    repository = open_repository(settings)
    try:
        store = object_store_from(settings)
    except StorageError as exc:
        fail(str(exc))
    stop = threading.Event()
    importer = Importer(store, repository, source=source, should_stop=stop.is_set)

    def skipped_line(skipped: Skipped | None) -> None:
        if skipped is not None:
            info(skipped.line())

    def summary(report: ImportReport) -> None:
        if as_json:
            typer.echo(json.dumps(report.as_dict(), indent=2))
        else:
            typer.echo(report.line())

    try:
        if not watch:
            files = list(iter_files(paths))
            with Progress(
                TextColumn("importing"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=stderr,
                transient=True,
                disable=quiet,
            ) as progress:
                task = progress.add_task("import", total=len(files))

                def on_file(path: Path, skipped: Skipped | None) -> None:
                    skipped_line(skipped)
                    progress.advance(task)

                report = importer.import_paths(paths, files=files, on_file=on_file)
            summary(report)
            return

        watchers = [
            FolderWatcher(
                p,
                importer,
                ledger_path_for(settings.home, p),
                interval=interval,
                on_batch=lambda name, r: info(f"{name}: {r.line()}"),
                on_file=lambda path, skipped: skipped_line(skipped),
            )
            for p in paths
        ]
        info(f"watching {', '.join(str(p) for p in paths)} every {interval:g} s; Ctrl-C to stop")
        total = ImportReport()
        try:
            while not stop.is_set():
                for w in watchers:
                    for _name, r in w.scan_once():
                        total.add(r)
                stop.wait(interval)
        except KeyboardInterrupt:
            stop.set()
        summary(total)
    except (ReceiverError, StorageError, OSError) as exc:
        fail(f"{type(exc).__name__}: {exc}")
