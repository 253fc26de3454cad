"""Engine and migrations on SQLite and PostgreSQL: the schema comes from Alembic and matches the models."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

import storage.models as m
from storage.db import create_engine, current_revision, head_revision, session, upgrade

EXPECTED_TABLES = {
    "app_setting", "peer", "node", "service", "service_job", "worker", "session", "job",
    "session_data", "session_file", "patient", "study", "series", "instance",
    "association", "association_series", "alembic_version",
}  # fmt: skip


def test_upgrade_creates_schema_and_is_idempotent(db_url: str) -> None:
    assert current_revision(db_url) is None
    upgrade(db_url)
    assert current_revision(db_url) == head_revision() == "0003"
    engine = create_engine(db_url)
    try:
        assert set(sa.inspect(engine).get_table_names()) == EXPECTED_TABLES
        upgrade(engine)  # a second run is a no-op, not an error
        assert current_revision(engine) == "0003"
    finally:
        engine.dispose()


def test_migrated_schema_matches_models(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        upgrade(engine)
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata)
        assert diffs == []
    finally:
        engine.dispose()


def test_downgrade_to_base_then_upgrade_again(db_url: str) -> None:
    from alembic import command

    from storage.db import alembic_config, write_transaction

    engine = create_engine(db_url)
    try:
        upgrade(engine)
        with write_transaction(engine) as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
        assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(engine)
        assert current_revision(engine) == "0003"
    finally:
        engine.dispose()


def _downgrade(engine: sa.Engine, revision: str) -> None:
    from alembic import command

    from storage.db import alembic_config, write_transaction

    with write_transaction(engine) as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def test_0002_downgrade_and_upgrade_keep_data_and_backfill_received(db_url: str) -> None:
    """0002 → 0001 → 0002 round trip on a database with records; the backfill marks as
    announced the studies the previous monitor certainly announced."""
    engine = create_engine(db_url)
    try:
        upgrade(engine, "0001")
        now = dt.datetime(2025, 3, 1, 8, 0, tzinfo=dt.UTC)
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO patient (id, patient_id, name, birth_date, sex, patient_key) "
                                 "VALUES (1, 'P', '', '', '', 'k')"))
            study = sa.table(
                "study", *(sa.column(c) for c in ("id", "study_uid", "patient_id", "date", "time", "description",
                                                   "accession_number", "referring_physician", "modalities",
                                                   "revision", "state", "emitted_revision")),
                sa.column("last_received_at", m.UTCDateTime()),
            )  # fmt: skip
            base = dict(patient_id=1, date="", time="", description="", accession_number="", referring_physician="",
                        modalities="CT", last_received_at=now)  # fmt: skip
            conn.execute(sa.insert(study), [
                dict(base, id=1, study_uid="1.1", revision=1, state="receiving", emitted_revision=None),
                dict(base, id=2, study_uid="1.2", revision=1, state="stable", emitted_revision=1),
                dict(base, id=3, study_uid="1.3", revision=2, state="receiving", emitted_revision=1),
            ])  # fmt: skip
        upgrade(engine)
        with engine.connect() as conn:
            query = sa.text("SELECT study_uid, received_emitted_at IS NOT NULL FROM study")
            got: dict[str, object] = dict(conn.execute(query).all())
        assert {k: bool(v) for k, v in got.items()} == {"1.1": False, "1.2": True, "1.3": True}

        _downgrade(engine, "0001")
        assert current_revision(engine) == "0001"
        columns = {c["name"] for c in sa.inspect(engine).get_columns("study")}
        assert not columns & {"received_claimed_by", "received_claimed_at", "received_emitted_at"}
        assert "ix_series_unemitted" not in {i["name"] for i in sa.inspect(engine).get_indexes("series")}
        upgrade(engine)
        assert current_revision(engine) == "0003"
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM study")).scalar_one() == 3
            diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata)
        assert diffs == []
    finally:
        engine.dispose()


def test_sqlite_engine_pragmas_and_parent_folder(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "records.db"
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            pragmas = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
        assert path.parent.is_dir()
        assert pragmas == {"journal_mode": "wal", "synchronous": 1, "foreign_keys": 1, "busy_timeout": 30_000}
    finally:
        engine.dispose()


def test_datetimes_are_utc_aware_and_naive_ones_refused(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        upgrade(engine)
        plus_two = dt.timezone(dt.timedelta(hours=2))
        local = dt.datetime(2024, 5, 1, 14, 0, tzinfo=plus_two)
        with session(engine) as s:
            s.add(m.Worker(name="w", created_at=local))
            s.commit()
        with session(engine) as s:
            got = s.get(m.Worker, 1)
            assert got is not None
            assert got.created_at == local and got.created_at.tzinfo == dt.UTC and got.created_at.hour == 12
        with session(engine) as s, pytest.raises(sa.exc.StatementError, match="naive datetime"):
            s.add(m.Worker(name="naive", created_at=dt.datetime(2024, 5, 1, 12, 0)))
            s.commit()
    finally:
        engine.dispose()


def test_bare_postgresql_url_gets_psycopg3_driver() -> None:
    engine = create_engine("postgresql://postgres@127.0.0.1:5432/nowhere")
    try:
        assert engine.url.drivername == "postgresql+psycopg"
        assert engine.pool._pre_ping  # type: ignore[attr-defined]
    finally:
        engine.dispose()


def test_postgresql_plans_every_statement_with_current_statistics(postgres_url: str) -> None:
    url = sa.engine.make_url(postgres_url).update_query_dict({"options": "-csearch_path=elsewhere"})
    engine = create_engine(url.render_as_string(hide_password=False))
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW plan_cache_mode").scalar() == "force_custom_plan"
            # options already in the URL are kept
            assert conn.exec_driver_sql("SHOW search_path").scalar() == "elsewhere"
    finally:
        engine.dispose()


def test_postgresql_connections_carry_network_limits(postgres_url: str) -> None:
    url = sa.engine.make_url(postgres_url).update_query_dict({"connect_timeout": "3"})
    engine = create_engine(url.render_as_string(hide_password=False))
    try:
        with engine.connect() as conn:
            info = conn.connection.dbapi_connection.info  # type: ignore[union-attr]
            params = info.get_parameters()
            assert params["connect_timeout"] == "3"  # the URL's own value wins
            assert params["keepalives_idle"] == "30" and params["tcp_user_timeout"] == "60000"
            # and libpq accepted them all: the connection works
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        engine.dispose()
