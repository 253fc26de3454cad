from __future__ import annotations

from pathlib import Path

import pytest

from dcmflow.settings import Settings


def test_defaults_live_under_home() -> None:
    s = Settings()
    assert s.home == Path(".dcmflow").resolve()
    assert s.ae_title == "DCMFLOW"
    assert s.dicom_port == 11112
    assert s.s3_endpoint is None
    assert s.effective_database_url == f"sqlite:///{(Path('.dcmflow') / 'dcmflow.db').resolve()}"
    assert s.objects_dir == Path(".dcmflow/objects").resolve()


def test_paths_are_absolute_and_keep_their_meaning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Relative means relative to the directory the settings were built in, fixed then: a record
    or a child process started elsewhere gets the same folders."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DCMFLOW_HOME", "link/./data")
    monkeypatch.setenv("DCMFLOW_TLS_CERT", "certs/node.pem")
    monkeypatch.setenv("DCMFLOW_TLS_KEY", "~/node.key")
    s = Settings()
    monkeypatch.chdir("/")
    home = tmp_path.resolve() / "real" / "data"
    assert s.home == home
    assert (s.objects_dir, s.spool_dir, s.services_dir) == (home / "objects", home / "spool", home / "services")
    assert s.effective_database_url == f"sqlite:///{home / 'dcmflow.db'}"
    assert s.tls_cert == tmp_path.resolve() / "certs" / "node.pem"
    assert s.tls_key == Path.home().resolve() / "node.key"
    assert Settings(home=Path("rel")).home == Path("/rel")  # built in /, as arguments too


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///records.db", "sqlite:///{cwd}/records.db"),
        ("sqlite+pysqlite:///sub/records.db?timeout=30", "sqlite+pysqlite:///{cwd}/sub/records.db?timeout=30"),
        ("sqlite:////srv/dcmflow/records.db", "sqlite:////srv/dcmflow/records.db"),
        ("sqlite://", "sqlite://"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("postgresql+psycopg://u:p@db/records", "postgresql+psycopg://u:p@db/records"),
    ],
)
def test_a_relative_sqlite_database_url_becomes_absolute(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DCMFLOW_DATABASE_URL", url)
    assert Settings().effective_database_url == expected.format(cwd=tmp_path.resolve())


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DCMFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("DCMFLOW_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("DCMFLOW_S3_ENDPOINT", "minio:9000")
    monkeypatch.setenv("DCMFLOW_S3_SECRET_KEY", "s3cr3t")
    monkeypatch.setenv("DCMFLOW_S3_SECURE", "true")
    monkeypatch.setenv("DCMFLOW_AE_TITLE", "PACSIN")
    monkeypatch.setenv("DCMFLOW_DICOM_PORT", "104")
    monkeypatch.setenv("DCMFLOW_STABLE_AGE", "5.5")
    s = Settings()
    assert s.home == tmp_path
    assert s.effective_database_url == "postgresql+psycopg://u@h/db"
    assert s.s3_endpoint == "minio:9000" and s.s3_secure is True
    assert s.s3_secret_key is not None and s.s3_secret_key.get_secret_value() == "s3cr3t"
    assert "s3cr3t" not in repr(s)
    assert (s.ae_title, s.dicom_port, s.stable_age) == ("PACSIN", 104, 5.5)


def test_bad_value_is_a_validation_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCMFLOW_DICOM_PORT", "eleven")
    with pytest.raises(ValueError, match="dicom_port"):
        Settings()


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("DCMFLOW_AE_TITLE", "A" * 17),
        ("DCMFLOW_AE_TITLE", "BAD\\AE"),
        ("DCMFLOW_AE_TITLE", "   "),
        ("DCMFLOW_DICOM_PORT", "70000"),
        ("DCMFLOW_STABLE_AGE", "-1"),
    ],
)
def test_out_of_range_values_are_refused(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=var.removeprefix("DCMFLOW_").lower()):
        Settings()


def test_ae_title_with_inner_space_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCMFLOW_AE_TITLE", "MY SCP")
    assert Settings().ae_title == "MY SCP"


def test_tls_certificate_and_key_go_together(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DCMFLOW_TLS_CERT", str(tmp_path / "cert.pem"))
    with pytest.raises(ValueError, match="DCMFLOW_TLS_CERT and DCMFLOW_TLS_KEY go together"):
        Settings()
    monkeypatch.setenv("DCMFLOW_TLS_KEY", str(tmp_path / "key.pem"))
    monkeypatch.setenv("DCMFLOW_TLS_CA", str(tmp_path / "ca.pem"))
    settings = Settings()
    assert (settings.tls_cert, settings.tls_key, settings.tls_ca) == (
        tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    )
