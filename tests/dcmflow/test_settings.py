from __future__ import annotations

from pathlib import Path

import pytest

from dcmflow.settings import Settings


def test_defaults_live_under_home() -> None:
    s = Settings()
    assert s.home == Path(".dcmflow")
    assert s.ae_title == "DCMFLOW"
    assert s.dicom_port == 11112
    assert s.s3_endpoint is None
    assert s.effective_database_url == f"sqlite:///{(Path('.dcmflow') / 'dcmflow.db').resolve()}"
    assert s.objects_dir == Path(".dcmflow/objects")


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
