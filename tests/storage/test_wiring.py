"""storage.wiring: the one place that builds the repository and the object store from settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from storage.db import upgrade
from storage.local import LocalObjectStore
from storage.wiring import engine_from, object_store_from, repository_from


@dataclass
class Settings:
    """Any object with these attributes will do (dcmflow.settings.Settings has them)."""

    effective_database_url: str
    objects_dir: Path
    s3_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: SecretStr | None = SecretStr("unused without an endpoint")
    s3_bucket: str = "dcmflow"
    s3_secure: bool = False
    s3_region: str | None = None


def test_repository_and_local_store_from_settings(tmp_path: Path) -> None:
    settings = Settings(f"sqlite:///{tmp_path / 'records.db'}", tmp_path / "objects")
    upgrade(engine_from(settings))
    assert repository_from(settings).count_records()["instances"] == 0
    store = object_store_from(settings)
    assert isinstance(store, LocalObjectStore)
    store.put("probe/one", b"x")
    assert store.get("probe/one") == b"x"
