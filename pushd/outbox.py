"""Writing to many sockets cheaply: what a fan-out does thousands of times a turn.

Twisted's `transport.write` buffers the bytes, registers the socket with epoll
and sends in a later reactor turn, then unregisters it: three system calls and
a turn per delivery, most of a fan-out's cost. `write_now` sends at once when
the socket has nothing buffered, which on a healthy connection is always, and
hands only what the kernel did not take to Twisted (whose buffer then pauses
the connection's producer, so the slow-consumer bound still sees it).

`Outbox` holds the frames a connection is sent during one reactor turn and
writes them together at its end: messages that arrive together (one read of
the bus, one batch publish) leave in one send per connection.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet import tcp

#: Queued bytes past which a connection is written at once, not at the turn's
#: end: a burst never waits in the outbox, only in the bounded transport buffer.
FLUSH_AT = 64 * 1024


def write_now(transport: Any, data: bytes) -> None:
    """`transport.write(data)`, with one direct send() when nothing waits before it."""
    if (
        type(transport) is tcp.Server
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # EAGAIN, or an error that Twisted's own write will find and report.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


class Queued(Protocol):
    def flush(self) -> None:
        """Write what was queued this turn."""


class Outbox:
    """Connections with frames queued this turn; all flushed at its end."""

    __slots__ = ("_call", "_clock", "_dirty")

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._dirty: list[Queued] = []
        self._call: Any = None

    def add(self, conn: Queued) -> None:
        """`conn` queued its first frame of this turn."""
        self._dirty.append(conn)
        if self._call is None:
            self._call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        self._call = None
        for conn in dirty:
            conn.flush()
