"""The publish connection: pushd's own Redis connection for the hot path.

One connection per process, commands pipelined on it: Redis runs commands one
at a time, so one connection that always has the next command waiting is as
fast as several, and keeps publishes in the order they were made. Commands
are RESP built by hiredis (`hiredis.pack_command`), replies parsed by
`hiredis.Reader`; `twisted.application.internet.ClientService` connects and
reconnects (with `backoffPolicy`), and a handshake (AUTH, SELECT, with
Sentinel a check that the server is the master, and SCRIPT LOAD of the
publishing scripts) runs before a connection takes a command.

What a failure means, for the caller (pushd.broker.redis.publisher):

- not connected: nothing was sent, nothing stored (`BrokerUnavailable`, 503);
- an error reply (`hiredis.ReplyError`, returned as the reply);
- the connection lost, or cut by the watchdog, after the command was written:
  the outcome is unknown (`OutcomeUnknown`, 504).

The watchdog: every `timeout` seconds, a connection whose oldest unanswered
command was already its oldest a tick ago is cut (so a command waits between
one and two timeouts); one timer for the connection, not one per command.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import hiredis
from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred, TimeoutError, fail
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from pushd.broker import BrokerUnavailable, OutcomeUnknown
from pushd.broker.redis.reachability import QuietClientService, Reachability
from pushd.sending import write_now

log = Logger()

#: Reconnect delays (s): RETRY_INITIAL, doubling, at most RETRY_MAX; every
#: connection to Redis waits so (the txredisapi ones through `retry_alike`).
RETRY_INITIAL = 0.1
RETRY_FACTOR = 2.0
RETRY_MAX = 2.0
#: The publish connection's: Twisted's backoffPolicy, with its jitter.
RETRY = backoffPolicy(initialDelay=RETRY_INITIAL, factor=RETRY_FACTOR, maxDelay=RETRY_MAX)

ReplyError = hiredis.ReplyError

#: Seconds a new connection's set-up may take when no --redis-timeout bounds it.
SETUP_TIMEOUT = 5.0


class _NotTimed:
    def observe(self, seconds: float) -> None:
        pass


#: What a command is timed with until metrics ask (RedisBroker.time_commands).
NOT_TIMED = _NotTimed()


def not_timed(command: str) -> Any:
    """A timer (`observe(seconds)`) of commands named `command`: none."""
    return NOT_TIMED


def command(*args: str | int | bytes) -> bytes:
    """A Redis command in RESP (hiredis.pack_command, whose stub types a 1-tuple)."""
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed


class RedisProtocol(Protocol):
    """One Redis connection: `execute` writes a RESP command and answers its
    reply (str, int, list, None, or a `ReplyError` instance: error replies are
    returned, not raised). Replies are matched to commands in order."""

    def __init__(
        self,
        on_made: Callable[[RedisProtocol], object] = lambda _: None,
        on_lost: Callable[[RedisProtocol], object] = lambda _: None,
        clock: Any = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock
        self._on_made = on_made
        self._on_lost = on_lost
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace")
        self.waiting: deque[Deferred[Any]] = deque()
        self.lost = False
        self._unsent: list[bytes] | None = None

    def execute(self, command: bytes) -> Deferred[Any]:
        """Queue `command`: the commands of one reactor turn go out together,
        in one send at its end (no write buffer to register with the reactor
        and unregister, three system calls, when the kernel takes them all)."""
        d: Deferred[Any] = Deferred()
        self.waiting.append(d)
        unsent = self._unsent
        if unsent is None:
            self._unsent = [command]
            self._clock.callLater(0, self._send)
        else:
            unsent.append(command)
        return d

    def _send(self) -> None:
        unsent, self._unsent = self._unsent, None
        if unsent and not self.lost:
            write_now(self._out(), b"".join(unsent))

    def _out(self) -> Any:
        # ITCPTransport, untyped without zope's mypy plugin.
        return self.transport

    def connectionMade(self) -> None:
        self._on_made(self)

    def dataReceived(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError:
                log.error("Redis sent what is not RESP: closing the publish connection")
                self._out().abortConnection()
                return
            if reply is False:
                return
            if not waiting:
                log.error("Redis sent a reply nothing asked for: closing the publish connection")
                self._out().abortConnection()
                return
            waiting.popleft().callback(reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        # The last ones waiting were never sent: nothing of them reached Redis.
        unsent, self._unsent = len(self._unsent or ()), None
        self._on_lost(self)
        waiting, self.waiting = self.waiting, deque()
        why = reason.getErrorMessage()
        sent = len(waiting) - unsent
        for n, d in enumerate(waiting):
            if n < sent:
                d.errback(OutcomeUnknown(f"Redis connection lost: {why}"))
            else:
                d.errback(
                    BrokerUnavailable(f"Redis connection lost before the command went: {why}")
                )


class PublishConnection:
    """The publish connection's life: `start` connects (and reconnects for
    ever), `stop` lets go; `execute` sends a command on the connection of the
    moment. Commands made while it is down fail at once (BrokerUnavailable).

    `endpoint` is where Redis is (with Sentinel: an endpoint that asks for the
    master before each attempt); `handshake` is the commands each new
    connection runs first (RESP, in order), an error reply failing it;
    `timeout` (seconds, 0 for none) is the watchdog's tick; with
    `require_master` a connection to a replica fails its set-up (Sentinel).
    `shard` names the Redis in the log (its description, without password).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoint: IStreamClientEndpoint,
        handshake: Callable[[], Sequence[bytes]],
        timeout: float,
        *,
        require_master: bool = False,
        on_connected: Callable[[], object] = lambda: None,
        shard: str = "",
    ) -> None:
        self.reachability = Reachability(shard, "publish connection")
        self._running = False
        self._handshake = handshake
        self._timeout = timeout
        self._require_master = require_master
        self._on_connected = on_connected
        self._clock = reactor
        self.current: RedisProtocol | None = None
        # Set-ups failed in a row: the reconnect delay grows with them too
        # (ClientService counts only connections that could not be made).
        self._failed_setups = 0
        factory: Any = Factory.forProtocol(partial(RedisProtocol, self._made, self._lost, reactor))
        factory.noisy = False
        # The set-up runs once ClientService has the connection, not as its
        # prepareConnection: a refused set-up must close the connection, and
        # ClientService cannot be told of a close while it is still preparing
        # one (automat's NoTransition).
        self._service = QuietClientService(
            self.reachability.watch(endpoint),
            factory,
            retryPolicy=lambda attempt: RETRY(max(attempt, self._failed_setups)),
            clock=reactor,
        )
        self._stuck: Deferred[Any] | None = None
        self._watchdog = LoopingCall(self._check_stuck)
        self._watchdog.clock = reactor

    @property
    def connected(self) -> bool:
        return self.current is not None

    def start(self) -> None:
        self._running = True
        self._service.startService()
        if self._timeout:
            self._watchdog.start(self._timeout, now=False)

    def stop(self) -> Deferred[None]:
        self._running = False
        if self._watchdog.running:
            self._watchdog.stop()
        self.current = None
        return self._service.stopService()

    def execute(self, command: bytes) -> Deferred[Any]:
        """Send `command` (RESP); fires with its reply (see RedisProtocol)."""
        current = self.current
        if current is None:
            return fail(BrokerUnavailable("Redis is not connected"))
        return current.execute(command)

    async def _set_up(self, proto: RedisProtocol) -> None:
        commands = self._handshake()
        replies = [proto.execute(command) for command in commands]
        try:
            for sent, d in zip(commands, replies, strict=True):
                reply = await d
                if isinstance(reply, ReplyError):
                    name = sent.split(b"\r\n", 3)[2].decode("ascii", "replace")
                    raise BrokerUnavailable(f"Redis refused {name}: {reply}")
        finally:
            # A set-up that ends early (refused, timed out) leaves the rest of
            # its replies to fail with the connection: nobody waits for them.
            for d in replies:
                if not d.called:
                    d.addErrback(lambda _: None)
        if self._require_master:
            # With Sentinel: a replica (a failover under way) fails the set-up: retry.
            role = await proto.execute(command("ROLE"))
            if isinstance(role, ReplyError) or not role or role[0] != "master":
                raise BrokerUnavailable("Redis is not the master (yet)")

    def _made(self, proto: RedisProtocol) -> None:
        """A new connection: its set-up (the handshake), within the timeout,
        before it takes a command; a refused or unanswered set-up closes it,
        and ClientService connects again after its delay."""

        def ready(_: object) -> None:
            if proto.lost:
                return
            self._failed_setups = 0
            self.current = proto
            self.reachability.connected()
            self._on_connected()

        def failed(failure: Failure) -> None:
            if proto.lost:
                return
            self._failed_setups += 1
            if failure.check(TimeoutError):
                why = f"no answer within {self._timeout or SETUP_TIMEOUT:g} s"
            else:
                why = failure.getErrorMessage() or type(failure.value).__name__
            self.reachability.set_up_failed(why)
            proto._out().abortConnection()

        d = Deferred.fromCoroutine(self._set_up(proto))
        d.addTimeout(self._timeout or SETUP_TIMEOUT, self._clock)
        d.addCallbacks(ready, failed)

    def _lost(self, proto: RedisProtocol) -> None:
        if self.current is proto:
            self.current = None
            if self._running:
                self.reachability.unreachable("connection lost")

    def reconnect(self) -> None:
        """Drop the connection of the moment (what waits on it: OutcomeUnknown);
        ClientService makes a new one."""
        current = self.current
        if current is not None:
            current._out().abortConnection()

    def _check_stuck(self) -> None:
        current = self.current
        oldest = current.waiting[0] if current is not None and current.waiting else None
        if current is not None and oldest is not None and oldest is self._stuck:
            log.warn("Redis did not answer in {timeout} s: reconnecting", timeout=self._timeout)
            current._out().abortConnection()
            oldest = None
        self._stuck = oldest

    def abandon(self) -> None:
        """Cut the connection if a command is unanswered: what waits fails with
        OutcomeUnknown (504), as after a watchdog cut."""
        current = self.current
        if current is not None and current.waiting:
            log.warn("stopping: Redis left commands unanswered; their outcome is unknown")
            current._out().abortConnection()
