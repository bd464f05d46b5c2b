"""Deferreds that wait together for one thing to come to pass: the last
connection gone, the last publish answered (a graceful stop waits for these)."""

from __future__ import annotations

from typing import TypeVar

from twisted.internet.defer import Deferred, succeed

_T = TypeVar("_T")


class Waiters:
    """Who waits; `fire()` when it has come to pass answers them all."""

    def __init__(self) -> None:
        self._waiting: list[Deferred[None]] = []

    def wait(self, already: bool) -> Deferred[None]:
        """Fires at the next `fire()`, or at once when it has `already` come to pass."""
        if already:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def fire(self) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)


class OpenConnections(set[_T]):
    """A listener's open connections; `all_gone()` fires once none is left (a
    graceful stop waits for it). A connection leaves with `discard`."""

    def __init__(self) -> None:
        super().__init__()
        self._waiters = Waiters()

    def discard(self, connection: object) -> None:
        super().discard(connection)
        if not self:
            self._waiters.fire()

    def all_gone(self) -> Deferred[None]:
        return self._waiters.wait(not self)
