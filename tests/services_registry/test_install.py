"""Install, re-install, remove and back up, on a real SQLite database and local object store."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from services_registry import InstallError, ServiceNotFoundError, ServiceValidationError, load_service
from services_registry.examples import FOLDER_EXAMPLE, PYTHON_EXAMPLE
from services_registry.install import (
    MANIFEST,
    backup_service,
    bundle_key,
    ensure_local,
    install_service,
    installed_specs,
    remove_service,
)
from storage import db
from storage.objects import ObjectStore, open_object_store
from storage.repository import Repository


@pytest.fixture
def env(tmp_path: Path) -> tuple[Path, Repository, ObjectStore]:
    engine = db.create_engine(f"sqlite:///{tmp_path / 'dcmflow.db'}")
    db.upgrade(engine)
    return tmp_path / "services", Repository(engine), open_object_store(local_root=tmp_path / "objects")


def install(env: tuple[Path, Repository, ObjectStore], target: object, name: str | None = None):  # type: ignore[no-untyped-def]
    services_dir, repository, store = env
    return install_service(load_service(str(target), name=name), services_dir=services_dir,
                           repository=repository, store=store)


def copy_example(tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "work" / "series-summary"
    shutil.copytree(FOLDER_EXAMPLE, target)
    return target


def test_install_copies_records_and_bundles(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    services_dir, repository, store = env
    result = install(env, copy_example(tmp_path))
    assert (result.name, result.version, result.changed) == ("series-summary", 1, True)
    folder = services_dir / "series-summary" / "1"
    assert (folder / "registry" / "settings.json").is_file() and (folder / "module" / "requirements.txt").is_file()
    assert (folder / MANIFEST).is_file()
    record = repository.get_service("series-summary")
    assert record is not None and record.content_hash == result.content_hash and record.bundle_key == bundle_key("series-summary", 1)
    jobs = {j.job_name: j for j in record.jobs}
    assert jobs["series-summary-markdown"].depends_on == ["series-summary"]
    assert jobs["series-summary"].timeout_seconds == 600 and jobs["series-summary"].params["output"] == "summaries"
    with tarfile.open(fileobj=io.BytesIO(store.get("services/series-summary/1.tar.gz")), mode="r:gz") as tar:
        names = set(tar.getnames())
    assert {"registry/settings.json", "module/series_summary/__init__.py", MANIFEST} <= names


def test_reinstall_unchanged_is_same_version_changed_is_new(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    services_dir, repository, store = env
    source = copy_example(tmp_path)
    install(env, source)
    again = install(env, source)
    assert (again.version, again.changed) == (1, False)
    (source / "module" / "series_summary" / "report.py").write_text("def render_markdown(s):\n    return ''\n")
    changed = install(env, source)
    assert (changed.version, changed.changed) == (2, True)
    assert repository.get_service("series-summary").version == 2  # type: ignore[union-attr]
    assert (services_dir / "series-summary" / "1").is_dir() and (services_dir / "series-summary" / "2").is_dir()
    assert store.exists("services/series-summary/2.tar.gz")


def test_python_service_installs_and_reloads(env) -> None:  # type: ignore[no-untyped-def]
    services_dir, repository, store = env
    result = install(env, PYTHON_EXAMPLE)
    assert result.name == "series-summary-py" and result.source == "python"
    assert (services_dir / "series-summary-py" / "1" / "python" / "series_summary_py.py").is_file()
    (spec,) = installed_specs(repository, services_dir, store)
    assert spec.version == "1" and spec.content_hash == result.content_hash
    assert [j.job_name for j in spec.jobs] == ["py-series-summary"]


def test_validation_runs_against_installed_services_before_anything_is_written(env, tmp_path, make_service) -> None:  # type: ignore[no-untyped-def]
    services_dir, repository, store = env
    install(env, copy_example(tmp_path))
    clash = make_service("clash", [{"jobName": "series-summary", "worker": "c.w", "callback": "c.cb"}],
                         {"c/__init__.py": "def cb(**kw):\n    return True\n"}, {"c/__init__.py": "def w(**kw):\n    pass\n"})
    with pytest.raises(ServiceValidationError, match="duplicate jobName 'series-summary' \\(already used by service 'series-summary'\\)"):
        install(env, clash)
    assert repository.get_service("clash") is None and not (services_dir / "clash").exists()
    assert not list(store.list("services/clash/"))


def test_files_are_fetched_from_the_bundle_on_another_machine(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    services_dir, repository, store = env
    install(env, copy_example(tmp_path))
    import shutil

    shutil.rmtree(services_dir)  # a machine that has only the database and the object store
    record = repository.get_service("series-summary")
    assert record is not None
    record = record.model_copy(update={"install_path": str(tmp_path / "elsewhere")})
    folder = ensure_local(record, services_dir, store)
    assert folder == services_dir / "series-summary" / "1"
    assert load_service(folder, name="series-summary").content_hash == record.content_hash


def test_backup_and_remove(env, tmp_path: Path, make_service) -> None:  # type: ignore[no-untyped-def]
    services_dir, repository, store = env
    install(env, copy_example(tmp_path))
    dependent = make_service("dep", [{"jobName": "after", "worker": "d.w", "callback": "d.cb", "dependsOn": "series-summary"}],
                             {"d/__init__.py": "def cb(**kw):\n    return True\n"}, {"d/__init__.py": "def w(**kw):\n    pass\n"})
    install(env, dependent)
    with pytest.raises(ServiceValidationError, match="depends on 'series-summary' of 'series-summary'; disable or remove 'dep' first"):
        remove_service("series-summary", services_dir=services_dir, repository=repository, store=store)
    assert remove_service("dep", services_dir=services_dir, repository=repository, store=store) == 1

    backup = backup_service("series-summary", tmp_path / "bk", services_dir=services_dir, repository=repository, store=store)
    assert (backup / "registry" / "settings.json").is_file() and not (backup / MANIFEST).exists()
    with pytest.raises(InstallError, match="exists already"):
        backup_service("series-summary", tmp_path / "bk", services_dir=services_dir, repository=repository, store=store)

    removed = remove_service("series-summary", services_dir=services_dir, repository=repository, store=store,
                             backup=tmp_path / "bk2")
    assert removed == 1 and (tmp_path / "bk2" / "series-summary" / "module").is_dir()
    assert repository.get_service("series-summary") is None and not (services_dir / "series-summary").exists()
    assert not store.exists("services/series-summary/1.tar.gz")
    with pytest.raises(ServiceNotFoundError, match="no installed service named 'series-summary'"):
        remove_service("series-summary", services_dir=services_dir, repository=repository, store=store)

    restored = install(env, tmp_path / "bk" / "series-summary")  # a backup is a service folder again
    assert restored.name == "series-summary" and restored.version == 1
