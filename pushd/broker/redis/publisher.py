"""The publish connections: the pool's commands, and the hot path past them.

Publishing runs one Lua script (scripts.py): XADD to the channel's history
stream (each entry links to the one before it), EXPIRE, PUBLISH of the
envelope with the stream id, and the idempotency record; so a message is
stored and sent atomically, or not at all. Scripts run with EVALSHA and are
loaded again after a NOSCRIPT (Redis restarted, SCRIPT FLUSH).

A publish's EVALSHA is written straight to a free pool connection (`_eval`),
its command bytes built from a template per channel (`_template`, `_fill`);
the pool's other commands go through txredisapi (`_call`, `_run`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from itertools import groupby
from operator import itemgetter
from typing import Any

import txredisapi
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    fail,
    succeed,
)
from twisted.logger import Logger

from pushd.broker import (
    Broker,
    BrokerUnavailable,
    IdempotencyKeyReused,
    OutcomeUnknown,
    Published,
    fingerprint,
)
from pushd.broker.redis.scripts import PUBLISH, PUBLISH_MANY, PUSH, Script
from pushd.message import envelope_prefix

log = Logger()


#: Where a command template (`_template`) leaves room for bytes given per call.
_HOLE: Any = object()


def _template(*args: Any) -> tuple[bytes, ...]:
    """A command in RESP, its arguments encoded as txredisapi encodes them
    (pushd's are bytes, str and int), in pieces split at each `_HOLE`: `_fill`
    puts each call's own bytes there."""
    pieces: list[bytes] = []
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        kind = type(arg)
        if arg is _HOLE:
            pieces.append(b"".join(parts))
            parts = []
            continue
        if kind is str:
            arg = arg.encode()
        elif kind is int:
            arg = b"%d" % arg
        elif kind is not bytes:
            raise TypeError(f"{kind.__name__} in a Redis command")
        parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    pieces.append(b"".join(parts))
    return tuple(pieces)


def _fill(pieces: tuple[bytes, ...], *values: bytes) -> bytes:
    parts = [pieces[0]]
    for value, piece in zip(values, pieces[1:], strict=True):
        parts += (b"$%d\r\n" % len(value), value, b"\r\n", piece)
    return b"".join(parts)


def _resp(*args: Any) -> bytes:
    return _template(*args)[0]


class _FastCommands:
    """txredisapi builds a command's bytes an argument at a time, through a
    bytearray: 7.5 us for a publish's ten arguments, the largest single cost of
    a POST. The same RESP, in one join. (Writing commands straight to the
    socket, or corked to the end of the turn, measured slower than Twisted's
    buffered write: Redis then reads fewer commands at once.)"""

    def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
        try:
            return _resp(*args)
        except (TypeError, UnicodeEncodeError):
            return super()._build_command(*args, **kwargs)  # type: ignore[misc]


def _fast_commands(factory: Any) -> None:
    """Connections the pool makes from now on build commands the fast way."""
    factory.protocol = type("PushdRedisProtocol", (_FastCommands, factory.protocol), {})


class Publisher(Broker):
    """The Redis broker's publishing, on the pool (`_pool`, `_pool_factory`)."""

    # What it uses of RedisBroker (pushd.broker.redis.broker), which sets it up:
    _reactor: Any
    _prefix: str
    _timeout: float
    _history_args: tuple[str, str, str]
    _meta_ttl: str
    _pool: Any
    _pool_factory: Any
    _stuck: dict[Any, Any]
    _stream: Callable[[str], str]

    async def _run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await self._call("evalsha", script.sha, keys=keys, args=args)
        except txredisapi.ScriptDoesNotExist:
            await self._call("script_load", script.source)
            return await self._call("evalsha", script.sha, keys=keys, args=args)

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A pool command, failing fast with BrokerUnavailable while Redis is away,
        and within the timeout when it does not answer."""
        if not (self._pool_factory and self._pool_factory.size):
            raise BrokerUnavailable("Redis is not connected")
        return await self._wait(getattr(self._pool, method)(*args, **kwargs))

    async def _wait(self, d: Deferred[Any]) -> Any:
        d.addTimeout(self._timeout or 3600, self._reactor)
        try:
            return await d
        except txredisapi.ScriptDoesNotExist:
            raise
        except (txredisapi.RedisError, TimeoutError, CancelledError) as e:
            raise BrokerUnavailable(f"Redis: {e or type(e).__name__}") from None

    def _publish_args(
        self, channel: str, data: bytes, idempotency_key: str | None, bound: str = ""
    ) -> tuple[list[str], list[Any]]:
        keys = [self._stream(channel)]
        if idempotency_key is not None:
            keys.append(f"{self._prefix}idempotency:{idempotency_key}")
        args = [
            self._prefix + channel,
            envelope_prefix(channel),
            data,
            *self._history_args,
            bound,
            self._meta_ttl,
        ]
        return keys, args

    def publish(
        self, channel: str, data: bytes, idempotency_key: str | None = None
    ) -> Deferred[Published]:
        if idempotency_key is None:
            # Everything but the data is the same for every publish to a channel.
            command = _fill(self._publish_command(channel), data)
        else:
            bound = fingerprint(b"1", [(channel, data)])
            keys, args = self._publish_args(channel, data, idempotency_key, bound)
            command = _resp("EVALSHA", PUBLISH.sha, len(keys), *keys, *args)
        return self.track(self._eval(PUBLISH, command, _published))

    @lru_cache(maxsize=4096)  # noqa: B019 (the broker lives as long as the process)
    def _publish_command(self, channel: str) -> tuple[bytes, ...]:
        """EVALSHA of publish.lua for `channel`, in RESP, around the data."""
        keys, args = self._publish_args(channel, _HOLE, None)
        return _template("EVALSHA", PUBLISH.sha, len(keys), *keys, *args)

    def _eval(self, script: Script, command: bytes, then: Callable[[Any], Any]) -> Deferred[Any]:
        """`then(reply)` of a publishing script's EVALSHA `command` (RESP), on the
        pool's first free connection, as txredisapi's handle would pick it, but
        without txredisapi's command machinery (three Deferreds and a timer per
        command): the command is written and the next reply taken from the
        connection's own reply queue, which is all that machinery does.
        Publishing is the hot path. A reply that never comes is the watchdog's
        (`_check_stuck`), not a timer's per command.

        Writing the command ourselves also tells what a failure means: before
        it was written, nothing can be stored (BrokerUnavailable, 503); once
        written, a lost connection or a watchdog's cut leaves the outcome
        unknown (OutcomeUnknown, 504)."""
        factory = self._pool_factory
        free = factory.connectionQueue.pending if factory is not None else ()
        conn = free[0] if free and free[0].connected else None
        if conn is None:
            conn = next((c for c in free if c.connected), None)
            if conn is None:
                return fail(BrokerUnavailable("Redis is not connected"))
        d: Deferred[Any] = conn.replyQueue.get()
        conn.transport.write(command)
        return d.addCallback(self._evaluated, script, command, then)

    def _evaluated(
        self, reply: Any, script: Script, command: bytes, then: Callable[[Any], Any]
    ) -> Any:
        if not isinstance(reply, Exception):
            return then(reply)
        if isinstance(reply, txredisapi.ResponseError):
            if str(reply).startswith("NOSCRIPT") and command.find(script.sha.encode()) >= 0:
                # Redis restarted or flushed its scripts: EVAL loads it again.
                return self._eval(script, _as_eval(command, script), then)
            # An error reply: the script stopped before its first write.
            raise BrokerUnavailable(f"Redis: {reply}")
        if isinstance(reply, txredisapi.RedisError):  # lost or timed out once sent
            raise OutcomeUnknown(f"Redis: {reply}")
        raise reply

    def _check_stuck(self) -> None:
        """Every `--redis-timeout`: a pool connection whose oldest unanswered
        command was already its oldest a tick ago is cut; what waits on it fails
        (a publish with OutcomeUnknown: 504) and the pool connects again."""
        stuck: dict[Any, Any] = {}
        for conn in list(self._pool_factory.pool if self._pool_factory else ()):
            waiting = conn.replyQueue.waiting
            oldest = waiting[0] if waiting else None
            if oldest is not None and self._stuck.get(conn) is oldest:
                log.warn("Redis did not answer in {timeout} s: reconnecting", timeout=self._timeout)
                conn.transport.abortConnection()
            else:
                stuck[conn] = oldest
        self._stuck = stuck

    def abandon(self) -> None:
        """Cut every pool connection with a command unanswered: what waits on
        it fails as after a watchdog cut (a publish: OutcomeUnknown, 504)."""
        for conn in list(self._pool_factory.pool if self._pool_factory else ()):
            if conn.replyQueue.waiting:
                log.warn("stopping: Redis left commands unanswered; their outcome is unknown")
                conn.transport.abortConnection()

    def publish_many(
        self, items: list[tuple[str, bytes]], idempotency_key: str | None = None
    ) -> Deferred[list[Published]]:
        # One script, whatever the size: all or nothing. (It blocks Redis while
        # it runs: about 2.5 us a message, 2.5 ms for 1,000.)
        if not items:
            return succeed([])
        key = bound = ""
        if idempotency_key is not None:
            key = f"{self._prefix}idempotency:{idempotency_key}"
            bound = fingerprint(b"n", items)
        args: list[Any] = [*self._history_args, self._meta_ttl, key, bound]
        for channel, run in groupby(items, itemgetter(0)):
            datas = [data for _, data in run]
            args += (
                self._stream(channel),
                self._prefix + channel,
                envelope_prefix(channel),
                len(datas),
                b"\n".join(datas),
            )
        command = _resp("EVALSHA", PUBLISH_MANY.sha, 0, *args)
        return self.track(self._eval(PUBLISH_MANY, command, _published_many))

    def push(
        self, channel: str, entry: bytes, event_list: str, data: bytes
    ) -> Deferred[tuple[bool, Published]]:
        command = _fill(self._push_command(channel, event_list), entry, data)
        return self.track(self._eval(PUSH, command, _pushed))

    @lru_cache(maxsize=4096)  # noqa: B019 (the broker lives as long as the process)
    def _push_command(self, channel: str, event_list: str) -> tuple[bytes, ...]:
        """EVALSHA of PUSH for `channel` in RESP, around the entry and the data."""
        keys, args = self._publish_args(channel, _HOLE, None)
        return _template(
            "EVALSHA", PUSH.sha, len(keys) + 2, channel, event_list, *keys, _HOLE, *args
        )


def _published(answer: list[Any]) -> Published:
    """publish.lua's {0|1|2, id}."""
    status, msg_id = answer
    status = int(status)
    if status == 2:
        raise IdempotencyKeyReused("the Idempotency-Key was first used with another request")
    return Published(msg_id, repeated=status == 1)


def _pushed(answer: list[Any]) -> tuple[bool, Published]:
    return True, _published(answer)


def _published_many(answer: str) -> list[Published]:
    """PUBLISH_MANY's "<0|1|2>:<id>,<id>,..."."""
    status, _, ids = answer.partition(":")
    if status == "2":
        raise IdempotencyKeyReused("the Idempotency-Key was first used with another request")
    return [Published(msg_id, repeated=status == "1") for msg_id in ids.split(",")]


def _as_eval(command: bytes, script: Script) -> bytes:
    """An EVALSHA command (RESP) of `script` as the EVAL of its source."""
    source = script.source.encode()
    evalsha = b"$7\r\nEVALSHA\r\n$40\r\n" + script.sha.encode() + b"\r\n"
    return command.replace(evalsha, b"$4\r\nEVAL\r\n$%d\r\n%s\r\n" % (len(source), source), 1)


def _log_failure(failure: Any, what: str) -> None:
    if not failure.check(txredisapi.ConnectionError):
        log.failure("Redis {what} failed", failure, what=what)
