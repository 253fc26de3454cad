"""A real PostgreSQL outage during receipt (issue 3): the receiver keeps acknowledging, ingest
keeps every file in the spool while the database is unreachable (one log line when the outage
starts, one when it ends), and everything is recorded once the database is back.

The outage is made by a small TCP forwarder between ingest and PostgreSQL: ``cut()`` closes its
listener and every forwarded connection, so new connections are refused and pooled ones are dead,
exactly what ingest sees when the server goes away; ``restore()`` listens on the same port again.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from receiver import status
from receiver.ingest import Ingester, IngestOptions
from storage.db import create_engine, upgrade
from storage.keys import instance_key
from storage.repository import InstanceIn, RecordOutcome, Repository
from tests.factories import make_small_series
from tests.receiver.conftest import AE_TITLE, Env, RunningScp

pytestmark = pytest.mark.postgres

UNAVAILABLE = "database unavailable"
WORKS_AGAIN = "database works again"


class TcpForwarder:
    """Forwards every connection to ``target`` (host, port) from a free loopback port (``self.port``).

    ``cut()`` closes the listener and every forwarded connection (both ends), and keeps the port
    bound without listening, so connection attempts are refused and nobody else takes the port;
    ``restore()`` listens on it again.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        reserved = self._bind(0)
        self._reserved: socket.socket | None = reserved
        self.port: int = reserved.getsockname()[1]
        self.restore()

    @staticmethod
    def _bind(port: int) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the cut connections are in TIME_WAIT
        sock.bind(("127.0.0.1", port))
        return sock

    def restore(self) -> None:
        sock, self._reserved = self._reserved, None
        assert sock is not None, "not cut"
        sock.listen(16)
        sock.settimeout(0.2)  # accept() wakes up now and then even if shutdown() did not wake it
        self._listener = sock
        self._start(self._accept, sock)

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns = list(self._conns)
        assert listener is not None, "already cut"
        _shutdown(listener)  # wakes the blocked accept() (Linux)
        listener.close()
        self._reserved = self._bind(self.port)
        for conn in conns:
            _shutdown(conn)  # FIN to PostgreSQL and to the client; their threads close the sockets
        threads, self._threads = self._threads, []
        for t in threads:
            t.join(10)
            assert not t.is_alive(), "a forwarding thread did not end"

    def close(self) -> None:
        if self._listener is not None:
            self.cut()
        if self._reserved is not None:
            self._reserved.close()

    def _start(self, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # a timeout, or the listener was cut
                if self._listener is not listener:
                    return
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._conns |= {client, upstream}
                self._start(self._forward, client, upstream)

    def _forward(self, client: socket.socket, upstream: socket.socket) -> None:
        back = threading.Thread(target=_copy, args=(upstream, client), daemon=True)
        back.start()
        _copy(client, upstream)
        back.join()
        with self._lock:
            self._conns -= {client, upstream}
        client.close()
        upstream.close()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _copy(src: socket.socket, dst: socket.socket) -> None:
    """Copy until either side ends, then end both (which wakes the other direction's recv)."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    _shutdown(src)
    _shutdown(dst)


class CountingRepository(Repository):
    """The real repository, counting ``record_instances`` attempts and failures."""

    def __init__(self, engine: sa.engine.Engine) -> None:
        super().__init__(engine)
        self.attempts = 0
        self.failures = 0

    def record_instances(self, batch: Sequence[InstanceIn]) -> list[RecordOutcome]:
        self.attempts += 1
        try:
            return super().record_instances(batch)
        except Exception:
            self.failures += 1
            raise


@dataclass
class OutageDb:
    """A migrated schema of its own in the session's PostgreSQL database, reached directly
    (``direct``, for the test's own queries) and through a forwarder (``repo``, for ingest)."""

    direct: sa.engine.Engine
    url: sa.engine.URL
    forwarder: TcpForwarder
    repo: CountingRepository

    def recorded(self, series: Sequence[Dataset]) -> int:
        """Instances of ``series`` recorded (queried through a direct connection)."""
        query = "select count(*) from instance i join series s on s.id = i.series_id where s.series_uid = :uid"
        with self.direct.connect() as conn:
            return int(conn.execute(sa.text(query), {"uid": series[0].SeriesInstanceUID}).scalar_one())

    def assert_unreachable(self) -> None:
        """The outage is real: nothing answers on the forwarder's port."""
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", self.forwarder.port), timeout=5).close()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(
                host="127.0.0.1",
                port=self.forwarder.port,
                user=self.url.username,
                dbname=self.url.database,
                connect_timeout=5,
            ).close()


@pytest.fixture
def outage_db(postgres_url: str) -> Iterator[OutageDb]:
    schema = f"outage_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = sa.engine.make_url(postgres_url).update_query_dict({"options": f"-csearch_path={schema}"})
    direct = create_engine(url.render_as_string(hide_password=False))
    forwarder: TcpForwarder | None = None
    repo: CountingRepository | None = None
    try:
        upgrade(direct)
        forwarder = TcpForwarder((url.host or "127.0.0.1", url.port or 5432))
        through = url.set(host="127.0.0.1", port=forwarder.port).render_as_string(hide_password=False)
        repo = CountingRepository(create_engine(through))
        yield OutageDb(direct, url, forwarder, repo)
    finally:
        if forwarder is not None:
            forwarder.close()
        if repo is not None:
            repo.engine.dispose()
        direct.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


class IngestThread:
    """``Ingester.run`` in a background thread; an exception that ends it is kept in ``crashed``."""

    def __init__(self, ingester: Ingester, stop: threading.Event) -> None:
        self.ingester = ingester
        self.stop = stop
        self.crashed: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="ingest-under-test")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.ingester.run()
        except BaseException as exc:
            self.crashed.append(exc)
            raise

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        """Poll ``condition``; fail if the worker dies or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.thread.is_alive(), f"the ingest worker died while waiting for {what}: {self.crashed}"
            assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
            time.sleep(0.05)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the ingest worker did not stop"
        assert not self.crashed, self.crashed


def _ingest(env: Env, db: OutageDb) -> IngestThread:
    stop = threading.Event()
    options = IngestOptions(batch_size=8, backoff_max=0.5)
    return IngestThread(Ingester(env.spool, env.store, db.repo, options=options, should_stop=stop.is_set), stop)


def _associate(port: int) -> Association:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    return assoc


def _lines(caplog: pytest.LogCaptureFixture, text: str, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "receiver.ingest" and r.levelno == level and text in r.getMessage()
    ]


def _assert_stored(env: Env, datasets: Sequence[Dataset]) -> None:
    for ds in datasets:
        key = instance_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert env.store.exists(key)
        assert (env.objects_dir / key).is_file()


def test_database_outage_keeps_spool_and_delivers_after_recovery(
    env: Env, scp: RunningScp, outage_db: OutageDb, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="receiver.ingest")
    db = outage_db
    first, second = make_small_series(6, seed=71), make_small_series(20, seed=72)
    ingest = _ingest(env, db)
    try:
        assoc = _associate(scp.port)
        for ds in first:
            assert assoc.send_c_store(ds).Status == status.SUCCESS
        ingest.wait_until(lambda: db.recorded(first) == len(first), "the first series to be recorded")
        ingest.wait_until(lambda: env.spool.count() == 0, "the spool to empty after the first series")
        assert not _lines(caplog, UNAVAILABLE, logging.ERROR)

        db.forwarder.cut()  # PostgreSQL goes away for ingest while the modality keeps sending
        db.assert_unreachable()
        for ds in second:
            assert assoc.send_c_store(ds).Status == status.SUCCESS  # still acknowledged
        assoc.release()

        ingest.wait_until(lambda: db.repo.failures >= 4, "several failed record attempts during the outage")
        assert len(_lines(caplog, UNAVAILABLE, logging.ERROR)) == 1, caplog.text
        assert not _lines(caplog, WORKS_AGAIN, logging.WARNING)
        assert ingest.ingester._outage == "database"
        assert env.spool.count() == len(second), "nothing may leave the spool while the database is down"
        assert db.recorded(second) == 0

        db.forwarder.restore()
        ingest.wait_until(lambda: db.recorded(second) == len(second), "the second series to be recorded")
        ingest.wait_until(lambda: env.spool.count() == 0, "the spool to empty after recovery")
    finally:
        ingest.finish()
    assert db.recorded(first) == len(first)
    assert db.recorded(second) == len(second)
    assert env.spool.count() == 0
    assert len(_lines(caplog, UNAVAILABLE, logging.ERROR)) == 1, caplog.text
    assert len(_lines(caplog, WORKS_AGAIN, logging.WARNING)) == 1, caplog.text
    assert "backlog" in _lines(caplog, UNAVAILABLE, logging.ERROR)[0]  # how much waits, when it starts
    assert "backlog" in _lines(caplog, WORKS_AGAIN, logging.WARNING)[0]  # and what it left
    assert ingest.ingester._outage is None
    _assert_stored(env, first + second)


def test_database_cut_inside_a_record_transaction_is_retried_whole(
    env: Env, scp: RunningScp, outage_db: OutageDb, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection dies between the batch's upserts and its instance inserts: the transaction is
    lost as a whole, the worker waits, and the batch is recorded once (all new) after the return."""
    caplog.set_level(logging.INFO, logger="receiver.ingest")
    db = outage_db
    series = make_small_series(12, seed=73)
    armed = threading.Event()
    cut_at: list[str] = []

    def cut_before_instance_insert(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if armed.is_set() and statement.lstrip().lower().startswith("insert into instance"):
            armed.clear()
            cut_at.append(statement)
            db.forwarder.cut()  # in the ingest thread, mid-transaction: this statement meets a dead socket

    sa.event.listen(db.repo.engine, "before_cursor_execute", cut_before_instance_insert)
    armed.set()
    ingest = _ingest(env, db)
    try:
        assoc = _associate(scp.port)
        for ds in series:
            assert assoc.send_c_store(ds).Status == status.SUCCESS
        assoc.release()
        ingest.wait_until(lambda: db.repo.failures >= 3, "several failed record attempts during the outage")
        assert cut_at, "the cut did not happen inside a transaction"
        db.assert_unreachable()
        assert len(_lines(caplog, UNAVAILABLE, logging.ERROR)) == 1, caplog.text
        assert env.spool.count() == len(series)
        assert db.recorded(series) == 0, "the interrupted transaction must not be half committed"

        db.forwarder.restore()
        ingest.wait_until(lambda: db.recorded(series) == len(series), "the series to be recorded")
        ingest.wait_until(lambda: env.spool.count() == 0, "the spool to empty after recovery")
    finally:
        ingest.finish()
    reports = ingest.ingester.reports
    assert sum(r.new for r in reports) == len(series)
    assert sum(r.duplicate + r.new_version for r in reports) == 0
    assert len(_lines(caplog, UNAVAILABLE, logging.ERROR)) == 1, caplog.text
    assert len(_lines(caplog, WORKS_AGAIN, logging.WARNING)) == 1, caplog.text
    _assert_stored(env, series)


def test_a_frozen_database_is_logged_when_it_stops_answering_and_when_it_answers_again(
    env: Env, scp: RunningScp, outage_db: OutageDb, caplog: pytest.LogCaptureFixture
) -> None:
    """No error at all, just no answer (a lock held elsewhere): after ``stall_seconds`` the
    worker logs the outage with the spool's backlog, and logs its end with the time it took."""
    caplog.set_level(logging.INFO, logger="receiver.ingest")
    db = outage_db
    series = make_small_series(10, seed=74)
    stop = threading.Event()
    options = IngestOptions(batch_size=20, backoff_max=0.5, stall_seconds=0.5)
    ingest = IngestThread(Ingester(env.spool, env.store, db.repo, options=options, should_stop=stop.is_set), stop)
    blocker = db.direct.connect()
    try:
        transaction = blocker.begin()
        blocker.exec_driver_sql("LOCK TABLE instance IN ACCESS EXCLUSIVE MODE")  # every insert now waits
        assoc = _associate(scp.port)
        for ds in series:
            assert assoc.send_c_store(ds).Status == status.SUCCESS
        assoc.release()
        ingest.wait_until(lambda: bool(_lines(caplog, UNAVAILABLE, logging.ERROR)), "the stall to be logged")
        (started,) = _lines(caplog, UNAVAILABLE, logging.ERROR)
        assert "no answer for" in started and f"backlog {len(series)} instances" in started, started
        assert db.repo.failures == 0  # nothing failed: it hangs
        transaction.rollback()  # the lock goes: the waiting transaction goes through
        ingest.wait_until(lambda: db.recorded(series) == len(series), "the series to be recorded")
        ingest.wait_until(lambda: bool(_lines(caplog, WORKS_AGAIN, logging.WARNING)), "the end to be logged")
    finally:
        blocker.close()
        ingest.finish()
    (ended,) = _lines(caplog, WORKS_AGAIN, logging.WARNING)
    assert re.search(r"works again after \d+\.\d s; backlog \d+ instances? \([\d.]+ MB\) in the spool", ended), ended
    assert env.spool.count() == 0
    _assert_stored(env, series)
