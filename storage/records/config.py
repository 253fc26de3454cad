"""Peers, cluster nodes and application settings: small key-addressed tables."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from storage import models as m
from storage.db import write_transaction
from storage.records._core import T_NODE, T_PEER, T_SETTING, RecordsCore, _public, _upsert

__all__ = ["ConfigRecords"]


class ConfigRecords(RecordsCore):
    """Peers (remote AEs), cluster nodes and application settings."""

    def upsert_peer(self, peer: m.PeerBase) -> m.PeerPublic:
        """Create or replace the peer with this name."""
        with write_transaction(self.engine) as conn:
            _upsert(conn, T_PEER, [peer.model_dump(include=set(m.PeerBase.model_fields))], ["name"])
            row = conn.execute(sa.select(T_PEER).where(T_PEER.c.name == peer.name)).one()
        return _public(m.PeerPublic, row)

    def get_peer(self, name: str) -> m.PeerPublic | None:
        """The peer with this name, or ``None``."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(T_PEER).where(T_PEER.c.name == name)).first()
        return _public(m.PeerPublic, row) if row is not None else None

    def list_peers(self, *, ae_title: str | None = None) -> list[m.PeerPublic]:
        """All peers by name, or those calling with ``ae_title``."""
        stmt = sa.select(T_PEER).order_by(T_PEER.c.name)
        if ae_title is not None:
            stmt = stmt.where(T_PEER.c.ae_title == ae_title)
        with self.engine.connect() as conn:
            return [_public(m.PeerPublic, r) for r in conn.execute(stmt)]

    def remove_peer(self, name: str) -> bool:
        """Delete a peer; False if there was none."""
        with write_transaction(self.engine) as conn:
            return conn.execute(sa.delete(T_PEER).where(T_PEER.c.name == name)).rowcount > 0

    def upsert_node(self, node: m.NodeBase) -> m.NodePublic:
        """Create or replace the local listener with this name."""
        with write_transaction(self.engine) as conn:
            _upsert(conn, T_NODE, [node.model_dump(include=set(m.NodeBase.model_fields))], ["name"])
            row = conn.execute(sa.select(T_NODE).where(T_NODE.c.name == node.name)).one()
        return _public(m.NodePublic, row)

    def get_node(self, name: str) -> m.NodePublic | None:
        """The local listener with this name, or ``None``."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(T_NODE).where(T_NODE.c.name == name)).first()
        return _public(m.NodePublic, row) if row is not None else None

    def list_nodes(self) -> list[m.NodePublic]:
        """All local listeners by name."""
        with self.engine.connect() as conn:
            return [_public(m.NodePublic, r) for r in conn.execute(sa.select(T_NODE).order_by(T_NODE.c.name))]

    def remove_node(self, name: str) -> bool:
        """Delete a local listener; False if there was none."""
        with write_transaction(self.engine) as conn:
            return conn.execute(sa.delete(T_NODE).where(T_NODE.c.name == name)).rowcount > 0

    def get_setting(self, key: str, default: Any = None) -> Any:
        """An application setting's JSON value, or ``default``."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(T_SETTING.c.value).where(T_SETTING.c.key == key)).first()
        return default if row is None else row[0]

    def set_setting(self, key: str, value: Any) -> None:
        """Create or replace an application setting (any JSON value)."""
        with write_transaction(self.engine) as conn:
            _upsert(conn, T_SETTING, [{"key": key, "value": value, "updated_at": m.utcnow()}], ["key"])

    def list_settings(self) -> dict[str, Any]:
        """All application settings."""
        with self.engine.connect() as conn:
            return dict(conn.execute(sa.select(T_SETTING.c.key, T_SETTING.c.value).order_by(T_SETTING.c.key)).all())
