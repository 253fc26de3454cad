"""Several receiving processes behind one TCP port (Linux ``SO_REUSEPORT``).

One Python process does the PDU handling of every association under one GIL; with ten
concurrent associations that process, not the disk, is the limit (issue 14). With
``SO_REUSEPORT`` each receiving process binds its own listening socket to the same port and the
kernel spreads new connections over them. Only what pynetdicom offers publicly is used: a
:class:`~pynetdicom.transport.ThreadedAssociationServer` subclass that sets the option in
``server_bind`` (socketserver's hook), built by an AE subclass through the public
``make_server(server_class=…)``.

Only sockets of the same user that all set the option may share a port, so a plain server (any
other program) already on the port still makes :func:`reserve_port` fail with "Address already
in use", as a single process would.
"""

from __future__ import annotations

import socket
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

__all__ = ["ReusePortAE", "ReusePortServer", "reserve_port"]


class ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's threaded server whose listening socket shares its port with the others."""

    def server_bind(self) -> None:
        """Set ``SO_REUSEPORT``, then bind as pynetdicom does."""
        assert self.socket is not None  # made by socketserver before it binds
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class ReusePortAE(AE):
    """An AE whose servers are :class:`ReusePortServer` (``start_server`` is unchanged)."""

    def make_server(  # type: ignore[override]
        self, address: Any, ae_title: Any = None, contexts: Any = None, ssl_context: Any = None,
        evt_handlers: Any = None, server_class: Any = None, **kwargs: Any,
    ) -> ReusePortServer:
        """pynetdicom's ``make_server`` with :class:`ReusePortServer` as the server class."""
        return super().make_server(  # type: ignore[return-value]
            address, ae_title=ae_title, contexts=contexts, ssl_context=ssl_context,
            evt_handlers=evt_handlers, server_class=ReusePortServer, **kwargs,
        )


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def reserve_port(host: str, port: int) -> socket.socket:
    """Claim ``(host, port)`` for the receiving processes; port 0 picks a free one.

    First a plain bind (as a single pynetdicom server does), which fails while anything listens
    there; then a bound, never-listening ``SO_REUSEPORT`` socket that keeps the port ours while
    a receiving process restarts (it takes no connections: only listening sockets do). Close it
    when the receiver stops.

    Raises
    ------
    OSError
        ``EADDRINUSE`` when the port is taken, or any other bind error.
    """
    family = _family(host)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    reservation = socket.socket(family, socket.SOCK_STREAM)
    try:
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reservation.bind((host, port))
    except BaseException:
        reservation.close()
        raise
    return reservation
