"""The command pool: txredisapi connections for every command but publishing.

History reads, subscriber counts, the application's commands and the epoch
check run here (`call`, `run`); publishing has a connection of its own
(connection.py). `--redis-pool-size` is this pool's size: commands wait for
a free connection, so it bounds how many of these commands Redis runs for
this process at once, not the publish rate.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import partial
from time import monotonic
from typing import Any

import txredisapi
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

from pushd.broker import BrokerUnavailable
from pushd.broker.redis.address import RedisAddress
from pushd.broker.redis.connection import RETRY_FACTOR, RETRY_INITIAL, RETRY_MAX, not_timed
from pushd.broker.redis.reachability import QuietSlots, Reachability
from pushd.broker.redis.scripts import Script


class KeepTrying(QuietSlots):
    """Mixed into pushd's txredisapi factories: txredisapi stops reconnecting
    for good when AUTH or SELECT fails as a connection starts (its protocol
    calls `factory.stopTrying()`), a timeout of a frozen Redis included, and
    a shard would then stay down until a restart. pushd's connections keep
    trying, with the backoff (`retry_alike`), until pushd stops them
    (`disconnect`, which does not go through `stopTrying`). A wrong password
    is said once, by `reachability`, not at every attempt (txredisapi's
    "could not auth" is left out of pushd's log: pushd.logs); nor are the
    attempts themselves (QuietSlots)."""

    #: Told of set-ups Redis refuses (CommandPool, Subscriber).
    reachability: Reachability | None = None

    def stopTrying(self) -> Deferred[None]:
        return succeed(None)

    def connectionError(self, why: str) -> None:
        super().connectionError(why)  # type: ignore[misc]
        if self.reachability is not None:
            # txredisapi's words, as the publish connection says it.
            refused = _TXREDISAPI_REFUSAL.match(why)
            if refused is not None:
                command = "AUTH" if refused["what"] == "auth" else "SELECT"
                if "Not received Redis response" in refused["reply"]:
                    # txredisapi's reply timeout: Redis said nothing at all.
                    why = f"no answer to {command}"
                else:
                    why = f"Redis refused {command}: {refused['reply']}"
            self.reachability.set_up_failed(why)


#: What txredisapi says when Redis refuses a connection's AUTH or SELECT.
_TXREDISAPI_REFUSAL = re.compile(
    r"Redis error: could not (?P<what>auth|set dbid=\S*): (?P<reply>.*)", re.DOTALL
)


class _Told:
    """Mixed into the command pool's factories: tells `reachability` when the
    pool's first connection is made and its last one lost (txredisapi's
    `addConnection` and `delConnection`, which count `size`)."""

    reachability: Reachability | None
    size: int
    disconnectCalled: bool

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)  # type: ignore[misc]
        if self.size and self.reachability is not None:
            self.reachability.connected()

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)  # type: ignore[misc]
        if not self.size and not self.disconnectCalled and self.reachability is not None:
            self.reachability.unreachable("connection lost")


#: Seconds after its due time a PatientTimeout fires: past the reactor's next pass.
_PASS = 0.001


class PatientTimeout:
    """txredisapi's reply timeout, fired only after the reactor has had one
    more pass over its sockets once it is due.

    The reactor runs its due timers before it reads its sockets. When one pass
    over them takes longer than the timeout (thousands of clients connecting
    at once: their handshakes handled in one pass), the timeout of a command
    sent in that pass is due before the answer, already in the socket, is
    read; txredisapi would then drop the connection and fail every command
    waiting on it (each subscription read among them answered `recovered`
    false). `active`/`cancel` are what txredisapi calls."""

    __slots__ = ("_call", "_clock", "_fire")

    def __init__(self, clock: Any, delay: float, fire: Callable[[], object]) -> None:
        self._clock = clock
        self._fire = fire
        self._call: Any = clock.callLater(delay, self._due)

    def _due(self) -> None:
        # Due after this round of timers: the reactor's next pass over its
        # sockets comes first, and takes the answer if it is there.
        self._call = self._clock.callLater(_PASS, self._expire)

    def _expire(self) -> None:
        self._call = None
        self._fire()

    def active(self) -> bool:
        return self._call is not None and bool(self._call.active())

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None


class _Patient:
    """Mixed into the pool's txredisapi protocols: reply timeouts are
    PatientTimeouts (txredisapi schedules them with `self.callLater`)."""

    #: The reactor the timeouts run on (a test's Clock on an instance).
    clock: Any = None

    def callLater(self, delay: float, f: Callable[..., object], *args: Any) -> Any:
        clock = self.clock
        if clock is None:
            from twisted.internet import reactor as clock
        if delay <= 0:  # txredisapi's other use: reading on in the next turn
            return clock.callLater(delay, f, *args)
        return PatientTimeout(clock, delay, partial(f, *args))


class PoolProtocol(_Patient, txredisapi.RedisProtocol):  # type: ignore[misc]
    """A connection of the command pool (one Redis)."""


class SentinelPoolProtocol(_Patient, txredisapi.SentinelRedisProtocol):  # type: ignore[misc]
    """A connection of the command pool (a master the Sentinels name)."""


class PoolFactory(_Told, KeepTrying, txredisapi.RedisFactory):  # type: ignore[misc]
    """The command pool's factory (one Redis)."""

    protocol = PoolProtocol


class SentinelPoolFactory(_Told, KeepTrying, txredisapi.SentinelConnectionFactory):  # type: ignore[misc]
    """The command pool's factory (a master the Sentinels name)."""

    protocol = SentinelPoolProtocol


def retry_alike(factory: txredisapi.RedisFactory) -> None:
    """Have a txredisapi factory reconnect as the publish connection does
    (its delays, 1 s up to 10 s by default, are its class's attributes), so
    that reads come back with publishing after an outage."""
    factory.initialDelay = RETRY_INITIAL
    factory.factor = RETRY_FACTOR
    factory.maxDelay = RETRY_MAX


class CommandPool:
    """The txredisapi connections of `factory` (a RedisFactory, a
    SentinelConnectionFactory with Sentinel), made through `endpoint` and
    remade on their own. Every command fails fast with BrokerUnavailable while
    none is connected, and within `timeout` seconds (0: none) when Redis does
    not answer. `shard` names the Redis in the log."""

    def __init__(
        self,
        reactor: IReactorTime,
        factory: txredisapi.RedisFactory,
        endpoint: IStreamClientEndpoint,
        timeout: float,
        shard: str = "",
    ) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._factory = factory
        retry_alike(factory)
        self.reachability = Reachability(shard, "command pool")
        factory.reachability = self.reachability
        # A slot that cannot connect while another is connected is no outage.
        self._endpoint = self.reachability.watch(endpoint, lambda: not factory.size)
        self.redis: Any = factory.handler
        self._timer: Callable[[str], Any] = not_timed
        self._timers: dict[str, Any] = {}

    @classmethod
    def options(cls, address: RedisAddress, timeout: float) -> dict[str, Any]:
        """txredisapi's connection options for `address`."""
        return {
            "isLazy": True,
            "password": address.password,
            "username": address.username,
            "replyTimeout": timeout or None,
            "convertNumbers": False,
        }

    @property
    def connected(self) -> bool:
        return bool(self._factory.size)

    def start(self) -> Deferred[Any]:
        """Connect; fires once the first connection is made."""
        self._factory.startConnecting(self._endpoint)
        return self._factory.deferred  # type: ignore[no-any-return]

    def stop(self) -> Deferred[Any]:
        return self._factory.disconnect()  # type: ignore[no-any-return]

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """txredisapi's `method` on a free connection (e.g. "publish", "execute_command")."""
        name = str(args[0]).lower() if method == "execute_command" and args else method
        return await self._call(name, method, *args, **kwargs)

    async def _call(self, name: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """`call`, timed as command `name` when Redis answers (an error reply
        included; not a lost connection or a timeout, which are no round trip)."""
        if not self.connected:
            raise BrokerUnavailable("Redis is not connected")
        started = monotonic()
        d: Deferred[Any] = getattr(self.redis, method)(*args, **kwargs)
        # Also bounds the wait for a free connection; due just after
        # txredisapi's own timeout, which drops a connection Redis stopped
        # answering on (cancelled first, the command would leave it up).
        timeout = PatientTimeout(self._reactor, (self._timeout or 3600) + 10 * _PASS, d.cancel)
        try:
            reply = await d
        except txredisapi.ResponseError as e:
            _let_go_of_frames(e)
            self._timed(name).observe(monotonic() - started)
            if str(e).startswith("NOSCRIPT"):
                raise _NoScript from None
            raise BrokerUnavailable(f"Redis: {e or type(e).__name__}") from None
        except CancelledError as e:
            _let_go_of_frames(e)
            raise BrokerUnavailable(f"Redis: no answer within {self._timeout:g} s") from None
        except (txredisapi.RedisError, TimeoutError) as e:
            _let_go_of_frames(e)
            raise BrokerUnavailable(f"Redis: {e or type(e).__name__}") from None
        finally:
            timeout.cancel()
        self._timed(name).observe(monotonic() - started)
        return reply

    def time(self, timer: Callable[[str], Any]) -> None:
        """Time commands with `timer(name)`, which gives what `observe(seconds)`."""
        self._timer = timer
        self._timers.clear()

    def _timed(self, name: str) -> Any:
        timer = self._timers.get(name)
        if timer is None:
            timer = self._timers[name] = self._timer(name)
        return timer

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA of `script`, loaded first when Redis does not have it."""
        # EVALSHA as a plain command, not txredisapi's `evalsha`: that one
        # swaps a NOSCRIPT's error for its own ScriptDoesNotExist in an errback
        # and drops it uncleaned, its cycle (`_let_go_of_frames`) with it.
        evalsha = ("execute_command", "EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self._call(script.name, *evalsha)
        except _NoScript:
            await self.call("script_load", script.source)
            return await self._call(script.name, *evalsha)


class _NoScript(Exception):
    """Redis answered NOSCRIPT: it does not have the script (restarted, SCRIPT FLUSH)."""


def _let_go_of_frames(error: BaseException) -> None:
    """Forget where `error` was raised. txredisapi hands an error reply (a
    ResponseError, a lost connection, its reply timeout) to the command's
    Deferred as a value and raises it in a callback (`handle_reply`), so the
    traceback's frames hold the error (as `r`, and `reply`, `obj`, `result` in
    the frames under it): error -> traceback -> frames -> error, a cycle left
    to the cycle collector, and with it every frame under it down to the
    reactor's, whatever their locals held (the connection the reactor read
    last, a closed WebSocket's included) until a full collection. Twisted
    clears this (`Failure.cleanFailure`) only for a Deferred that ends with an
    unhandled failure, not for one awaited and caught."""
    error.__traceback__ = None
