"""Writing to many sockets cheaply: what a fan-out does thousands of times a
turn, what a producer's answer and the commands of a turn to Redis do once.

Twisted's `transport.write` buffers the bytes, registers the socket with epoll
and sends in a later reactor turn, then unregisters it: three system calls and
a turn per delivery, most of a fan-out's cost. `write_now` sends at once when
the socket has nothing buffered, which on a healthy connection is always, and
hands only what the kernel did not take to Twisted (whose buffer then pauses
the connection's producer, so the slow-consumer bound still sees it).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.tcp import Client as _Client
from twisted.internet.tcp import Server as _Server

# TCP connections accepted (subscribers, producers) and made (Redis).
_TCP = (_Server, _Client)


def write_now(transport: Any, data: bytes) -> None:
    """`transport.write(data)`, with one direct send() when nothing waits before it."""
    # A plain TCP connection with nothing in Twisted's buffer (which is emptied
    # to b"" once all of it is sent): checked cheapest first, it runs per delivery.
    if (
        type(transport) in _TCP
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and not transport.TLS
        and transport.connected
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


def unsent(transport: Any) -> bool:
    """Whether bytes written to `transport` may still wait to be sent: False
    only for a plain TCP connection whose buffer Twisted has emptied (the test
    `write_now` makes inline, where a call per delivery would cost)."""
    if type(transport) in _TCP and not transport.TLS:
        return bool(transport.dataBuffer or transport._tempDataBuffer)
    return transport is not None
