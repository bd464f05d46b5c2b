"""The epoll reactor's poll, handing each ready socket its event directly.

Twisted's `EPollReactor.doPoll` calls each ready socket through
`log.callWithLogger`, which asks the socket for its log prefix and runs the
call in a copy of the legacy log context, so that a `twisted.python.log.msg`
made inside names its connection. On a producer's publish (one read, one
answer) that shows: without it, `POST /channels` and `POST /push`
at wrk -c8 answered 11% and 15% more requests a second (medians of 3 runs,
alternately, pushd and Redis on one core; bench/README.md, "2026-11-30: the
producers' path again").
pushd logs with `twisted.logger`, whose events name their module, not that
context: only messages of Twisted's own legacy code made while a socket is
handled lose the connection's name (they say `-`).

The exception boundary stays as Twisted's: whatever a socket's handling raises
(its protocol's `connectionLost`, say; KeyboardInterrupt apart) is logged and
the loop goes on to the batch's next socket. The loop is Twisted 26.10's
`doPoll` otherwise unchanged; tests/test_canaries.py checks Twisted's still is
what this one copies.
"""

from __future__ import annotations

import errno
from types import MethodType
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

log = Logger()


def _do_poll(self: Any, timeout: float | None) -> None:
    if timeout is None:
        timeout = -1
    try:
        events = self._poller.poll(timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    handle = self._doReadOrWrite
    selectables = self._selectables
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        try:
            handle(selectable, fd, event)
        except KeyboardInterrupt:
            raise
        except BaseException:
            # As log.callWithLogger: whatever a socket raises is that socket's failure.
            log.failure("handling an event of {selectable!r} failed", selectable=selectable)


def dispatch_directly(reactor: Any) -> bool:
    """Make `reactor` (when Twisted's epoll reactor) poll with `_do_poll`;
    False, and nothing changed, for any other reactor."""
    if type(reactor) is not EPollReactor:
        return False
    # An instance attribute: ReactorBase.mainLoop calls self.doIteration.
    target: Any = reactor
    target.doIteration = MethodType(_do_poll, reactor)
    return True
