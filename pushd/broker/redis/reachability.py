"""Redis reachable or not, said once per change, in words.

Each kind of connection to a shard (the publish connection, the command pool,
the subscriber connection) has a `Reachability`, which logs

    Redis 127.0.0.1:6379 unreachable: connection refused; retrying (publish connection)
    Redis 127.0.0.1:6379 connected (publish connection)

(or "set-up failed: Redis refused AUTH: ...; retrying" when Redis answers but
refuses the connection's set-up: a wrong password, a replica where the master
was expected) once when that changes, not at every attempt: the attempts go on quietly
(`QuietClientService`, `QuietSlots`), at the backoff of
pushd.broker.redis.connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.application.internet import ClientService
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()


class Reachability:
    """One kind of connection (`kind`, e.g. "publish connection") to one Redis
    (`shard`, its description without password): `connected` and
    `unreachable` and `set_up_failed` log only when the state changes."""

    def __init__(self, shard: str, kind: str) -> None:
        self.shard = shard
        self.kind = kind
        #: None until the first attempt's outcome, then "connected",
        #: "unreachable" or "set-up failed".
        self.state: str | None = None

    @property
    def up(self) -> bool:
        return self.state == "connected"

    def _becomes(self, state: str) -> bool:
        changed, self.state = self.state != state, state
        return changed

    def connected(self, detail: str = "") -> None:
        """A connection works again; `detail` is added to the kind ("subscribing 3 channels")."""
        if self._becomes("connected"):
            log.info(
                "Redis {shard} connected ({connection})",
                shard=self.shard,
                connection=f"{self.kind}, {detail}" if detail else self.kind,
                kind=self.kind,
            )

    def unreachable(self, why: str) -> None:
        """No connection works: `why` in words ("connection refused")."""
        if self._becomes("unreachable"):
            log.warn(
                "Redis {shard} unreachable: {reason}; retrying ({kind})",
                shard=self.shard,
                reason=why,
                kind=self.kind,
            )

    def set_up_failed(self, why: str) -> None:
        """Redis answers, but refuses what a new connection runs first (AUTH,
        SELECT; with Sentinel, a replica): `why`, Redis's words."""
        if self._becomes("set-up failed"):
            log.warn(
                "Redis {shard} set-up failed: {reason}; retrying ({kind})",
                shard=self.shard,
                reason=why.rstrip("."),
                kind=self.kind,
            )

    # Endpoints are typed Any: IStreamClientEndpoint is a zope interface, which
    # mypy does not see a class provide.
    def watch(self, endpoint: Any, when: Callable[[], bool] = lambda: True) -> Any:
        """`endpoint` (an IStreamClientEndpoint), whose failed connection
        attempts make this unreachable while `when()` is true."""

        def failed(failure: Failure) -> None:
            if when():
                self.unreachable(in_words(failure))

        return _Watched(endpoint, failed)


def in_words(failure: Failure) -> str:
    """Why a connection attempt failed, in a few words ("connection refused")."""
    value = failure.value
    if isinstance(value, error.TimeoutError | error.TCPTimedOutError):
        return "connection timed out"
    if isinstance(value, error.DNSLookupError):
        return f"cannot resolve {value.args[0]}" if value.args else "DNS lookup failed"
    if isinstance(value, error.ConnectError) and value.args and isinstance(value.args[0], str):
        text: str = value.args[0]
        if text:
            return text[:1].lower() + text[1:]
    return failure.getErrorMessage() or type(value).__name__


@implementer(IStreamClientEndpoint)
class _Watched:
    """An endpoint that tells `failed` of every connection attempt that fails
    (a cancelled one aside: that is a stop), and passes the failure on."""

    def __init__(self, endpoint: Any, failed: Callable[[Failure], None]) -> None:
        self._endpoint = endpoint
        self._failed = failed

    def connect(self, factory: Any) -> Deferred[Any]:
        def failed(failure: Failure) -> Failure:
            if not failure.check(CancelledError, error.ConnectingCancelledError):
                self._failed(failure)
            return failure

        connecting: Deferred[Any] = self._endpoint.connect(factory)
        return connecting.addErrback(failed)


def _discard(event: Any) -> None:
    """A log observer (ILogObserver) that keeps nothing."""


_nowhere: Any = _discard


class QuietClientService(ClientService):
    """ClientService without its "Scheduling retry 5 to connect
    <TCP4ClientEndpoint object at 0x...> in 1.6 seconds" at every attempt of
    every connection: `Reachability` says what changed."""

    _log = Logger(observer=_nowhere)


class _QuietSlot(txredisapi._PoolSlot):  # type: ignore[misc]
    """A txredisapi pool slot whose ClientService is quiet: the same one,
    made with the same arguments, as a QuietClientService."""

    def __init__(self, factory: Any, endpoint: Any, reconnect: bool = True) -> None:
        super().__init__(factory, endpoint, reconnect)
        self.service = QuietClientService(
            endpoint,
            txredisapi._SlotFactory(factory, self),
            retryPolicy=self._retryDelay,
            prepareConnection=self._prepareConnection,
        )


class QuietSlots:
    """Mixed into a txredisapi factory: `startConnecting` as txredisapi's,
    with quiet slots (`_QuietSlot`)."""

    poolsize: int
    reconnect: bool
    slots: list[Any]

    def startConnecting(self, endpoint: Any) -> None:
        for _ in range(self.poolsize):
            slot = _QuietSlot(self, endpoint, self.reconnect)
            self.slots.append(slot)
            slot.start()
