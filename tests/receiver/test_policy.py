"""Who may send: trusted networks, configured peers, accept-any, called-AE check (PS3.8 §9.3.4)."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from receiver import status
from receiver.associations import AssociationTracker, CallerPolicy, PeerEntry
from receiver.runner import _peers_of
from receiver.scp import ScpConfig, start_scp
from storage.models import PeerBase
from tests.receiver.conftest import AE_TITLE, DCMTK_ECHOSCU, Env, free_port

# A network that does not contain 127.0.0.1: loopback callers count as "remote" here.
_ELSEWHERE = ("192.0.2.0/24",)  # TEST-NET-1 (RFC 5737)


def _serve(env: Env, policy: CallerPolicy) -> Iterator[int]:
    port = free_port()
    server = start_scp(ScpConfig(ae_title=AE_TITLE, host="127.0.0.1", port=port), env.spool, AssociationTracker(), policy)
    try:
        yield port
    finally:
        server.shutdown()


def _echo(port: int, calling: str, called: str = AE_TITLE):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=called)


@pytest.fixture
def peers_port(env: Env) -> Iterator[int]:
    """SCP whose trusted networks exclude loopback and whose peers come from the database."""
    env.repo.upsert_peer(PeerBase(name="ct1", ae_title="GOODPEER", host="127.0.0.1", port=104, allow_send=True))
    env.repo.upsert_peer(PeerBase(name="pacs", ae_title="NOSEND", host="127.0.0.1", port=104, allow_send=False))
    env.repo.upsert_peer(PeerBase(name="far", ae_title="FARPEER", host="192.0.2.7", port=104, allow_send=True))

    yield from _serve(env, CallerPolicy(trusted_networks=_ELSEWHERE, peers=_peers_of(env.repo)))


def _rejection(assoc) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    rsp = assoc.acceptor.primitive
    return int(rsp.result), int(rsp.result_source), int(rsp.diagnostic)


def test_unknown_remote_caller_is_rejected_with_calling_aet_not_recognised(peers_port: int) -> None:
    assoc = _echo(peers_port, "STRANGER")
    assert assoc.is_rejected
    assert _rejection(assoc) == (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
    # DCMTK sees the same A-ASSOCIATE-RJ
    result = subprocess.run(
        [DCMTK_ECHOSCU, "-aet", "STRANGER", "-aec", AE_TITLE, "127.0.0.1", str(peers_port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr or "Rejected" in result.stderr


def test_configured_peer_is_accepted_others_not(peers_port: int) -> None:
    assoc = _echo(peers_port, "GOODPEER")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == status.SUCCESS
    assoc.release()
    assert _echo(peers_port, "NOSEND").is_rejected  # a peer without allow_send
    assert _echo(peers_port, "FARPEER").is_rejected  # right AE title, wrong host


def test_loopback_trusted_by_default_and_accept_any(env: Env) -> None:
    for port in _serve(env, CallerPolicy()):
        assoc = _echo(port, "ANYONE")
        assert assoc.is_established
        assoc.release()
    for port in _serve(env, CallerPolicy(accept_any=True, trusted_networks=_ELSEWHERE)):
        assoc = _echo(port, "ANYONE")
        assert assoc.is_established
        assoc.release()


def test_wrong_called_ae_title_is_rejected(env: Env) -> None:
    for port in _serve(env, CallerPolicy()):
        assoc = _echo(port, "ANYONE", called="NOTUS")
        assert assoc.is_rejected
        assert _rejection(assoc) == (0x01, 0x01, 0x07)  # called AE title not recognised


def test_policy_survives_a_failing_peer_source() -> None:
    calls = {"n": 0}

    def peers() -> list[PeerEntry]:
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("database down")
        return [PeerEntry("GOODPEER", "*")]

    policy = CallerPolicy(trusted_networks=_ELSEWHERE, peers=peers, refresh_seconds=0)
    assert policy.allows("GOODPEER", "203.0.113.9")[0]
    assert policy.allows("GOODPEER", "203.0.113.9")[0]  # last known peers kept
    assert not policy.allows("OTHER", "203.0.113.9")[0]
    assert CallerPolicy().allows("X", "::ffff:127.0.0.1")[0]  # IPv4-mapped loopback


def _tls_echo(port: int, calling: str, cert: Path):  # type: ignore[no-untyped-def]
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=AE_TITLE, tls_args=(client, "127.0.0.1"))


def test_tls_association(env: Env, tls_certificate: tuple[Path, Path]) -> None:
    """Optional TLS (PS3.15 B.1): a self-signed certificate, a pynetdicom SCU verifying it."""
    cert, key = tls_certificate
    port = free_port()
    config = ScpConfig(ae_title=AE_TITLE, host="127.0.0.1", port=port, tls_cert=cert, tls_key=key)
    server = start_scp(config, env.spool, AssociationTracker(), CallerPolicy())
    try:
        assoc = _tls_echo(port, "TLSSCU", cert)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == status.SUCCESS
        assoc.release()
        plain = _echo(port, "PLAIN")  # a cleartext caller cannot associate
        assert not plain.is_established
    finally:
        server.shutdown()


def test_a_peer_marked_tls_is_accepted_over_tls_only(env: Env, tls_certificate: tuple[Path, Path]) -> None:
    """Peer.tls: its AE title and address over plain TCP are refused (it may be an impostor);
    the same caller over TLS, and peers without the mark over plain TCP, are accepted."""
    cert, key = tls_certificate
    env.repo.upsert_peer(PeerBase(name="secure", ae_title="SECUREPEER", host="127.0.0.1", port=104, tls=True))
    env.repo.upsert_peer(PeerBase(name="plain", ae_title="PLAINPEER", host="127.0.0.1", port=104))
    policy = CallerPolicy(trusted_networks=_ELSEWHERE, peers=_peers_of(env.repo))
    plain_port, tls_port = free_port(), free_port()
    tls_config = ScpConfig(ae_title=AE_TITLE, host="127.0.0.1", port=tls_port, tls_cert=cert, tls_key=key)
    plain_server = start_scp(
        ScpConfig(ae_title=AE_TITLE, host="127.0.0.1", port=plain_port), env.spool, AssociationTracker(), policy
    )
    tls_server = start_scp(tls_config, env.spool, AssociationTracker(), policy)
    try:
        refused = _echo(plain_port, "SECUREPEER")
        assert refused.is_rejected
        assert _rejection(refused) == (0x01, 0x01, 0x03)
        assert policy.allows("SECUREPEER", "127.0.0.1") == (False, "configured peer that must use TLS, over plain TCP")
        for assoc in [_tls_echo(tls_port, "SECUREPEER", cert), _echo(plain_port, "PLAINPEER")]:
            assert assoc.is_established
            assert assoc.send_c_echo().Status == status.SUCCESS
            assoc.release()
    finally:
        plain_server.shutdown()
        tls_server.shutdown()
