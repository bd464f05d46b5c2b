"""Publishing: the hot path, on the publish connection (connection.py).

Each publish runs one Lua script (scripts.py): XADD to the channel's history
stream (each entry links to the one before it), EXPIRE, PUBLISH of the
envelope with the stream id, and the idempotency record; so a message is
stored and sent atomically, or not at all. Scripts run with EVALSHA, built by
`hiredis.pack_command`; a NOSCRIPT (Redis restarted, SCRIPT FLUSH) sends the
command again as EVAL of the script's source.

What a failure means (the caller's HTTP answer):

- nothing sent (not connected), or an error reply (the scripts write nothing
  before they can fail): BrokerUnavailable, 503;
- sent, then the connection lost or cut by the watchdog: OutcomeUnknown, 504;
- an Idempotency-Key first used with another request: IdempotencyKeyReused, 422.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import groupby
from operator import itemgetter
from time import monotonic
from typing import Any, TypeVar

from hiredis import pack_command
from twisted.internet.defer import Deferred, succeed

from pushd.broker import (
    BrokerUnavailable,
    IdempotencyKeyReused,
    OutcomeUnknown,
    Published,
    fingerprint,
)
from pushd.broker.redis.connection import NOT_TIMED, PublishConnection, ReplyError
from pushd.broker.redis.keys import Keys
from pushd.broker.redis.scripts import PUBLISH, PUBLISH_MANY, PUSH, Script
from pushd.message import envelope_prefix

T = TypeVar("T")

#: The scripts the publish connection runs (and times).
_SCRIPTS = (PUBLISH, PUBLISH_MANY, PUSH)


class Publisher:
    """Publishes on `connection`: `history` is publish.lua's (size, TTL s,
    idempotency TTL s) and `meta_ttl` how long (s) a channel's newest id is
    remembered (pushd.broker.meta_ttl)."""

    def __init__(
        self,
        connection: PublishConnection,
        keys: Keys,
        history: tuple[int, int, int],
        meta_ttl: int,
    ) -> None:
        self._connection = connection
        self._keys = keys
        self._history = tuple(str(n) for n in history)
        self._meta_ttl = str(meta_ttl)
        # A channel's publish and push commands, in pieces around what each
        # call gives (see `_template`).
        self._commands: dict[tuple[str, str | None], tuple[bytes, ...]] = {}
        self._timers: dict[Script, Any] = dict.fromkeys(_SCRIPTS, NOT_TIMED)

    def time(self, timer: Callable[[str], Any]) -> None:
        """Time each script's round trip (the first EVALSHA: a NOSCRIPT's EVAL
        again is rare) with `timer(script's name)`, which gives what `observe(seconds)`."""
        self._timers = {script: timer(script.name) for script in _SCRIPTS}

    def _publish_args(
        self, channel: str, data: bytes, idempotency_key: str | None, bound: str
    ) -> tuple[Any, ...]:
        """publish.lua's numkeys, KEYS and ARGV."""
        keys = self._keys
        if idempotency_key is None:
            head: tuple[Any, ...] = (1, keys.history(channel))
        else:
            head = (2, keys.history(channel), keys.idempotency(idempotency_key))
        return (
            *head,
            keys.bus(channel),
            envelope_prefix(channel),
            data,
            *self._history,
            bound,
            self._meta_ttl,
        )

    def publish(
        self, channel: str, data: bytes, idempotency_key: str | None = None
    ) -> Deferred[Published]:
        if idempotency_key is None:
            # The hot path: everything but the data is the same for every
            # publish to a channel.
            pieces = self._commands.get((channel, None)) or self._template(channel, None)
            started = monotonic()
            d = self._connection.execute(_fill(pieces, data))
            args_of = self._publish_args
            return d.addCallback(
                self._answered, started, PUBLISH, _published, args_of, channel, data, None, ""
            )
        bound = fingerprint(b"1", [(channel, data)])
        args = self._publish_args(channel, data, idempotency_key, bound)
        return self._eval(PUBLISH, args, _published)

    def _push_args(self, channel: str, entry: Any, event_list: str, data: Any) -> tuple[Any, ...]:
        """push.lua's numkeys, KEYS and ARGV (publish.lua's after its own)."""
        numkeys, *keys_and_args = self._publish_args(channel, data, None, "")
        keys, args = keys_and_args[:numkeys], keys_and_args[numkeys:]
        return (numkeys + 2, channel, event_list, *keys, entry, *args)

    def _template(self, channel: str, event_list: str | None) -> tuple[bytes, ...]:
        """The EVALSHA of publish.lua for `channel` (no idempotency key), or
        with `event_list` of push.lua, in RESP as hiredis packs it, in pieces
        around the bulk strings each call gives (`_fill`)."""
        if event_list is None:
            command = ("EVALSHA", PUBLISH.sha, *self._publish_args(channel, _HOLE, None, ""))
        else:
            command = ("EVALSHA", PUSH.sha, *self._push_args(channel, _HOLE, event_list, _HOLE))
        pieces: list[bytes] = []
        run: list[Any] = []
        for arg in command:
            if arg is _HOLE:
                pieces.append(_bulk_strings(run))
                run = []
            else:
                run.append(arg)
        pieces.append(_bulk_strings(run))
        pieces[0] = b"*%d\r\n%s" % (len(command), pieces[0])
        if len(self._commands) >= 4096:  # bounded: channels come and go
            self._commands.clear()
        self._commands[channel, event_list] = template = tuple(pieces)
        return template

    def publish_many(
        self,
        items: list[tuple[str, bytes]],
        idempotency_key: str | None = None,
        bound_to: list[tuple[str, bytes]] | None = None,
    ) -> Deferred[list[Published]]:
        """`items` in one script, whatever their number: all or nothing. (It
        blocks Redis while it runs: about 2.5 us a message, 2.5 ms for 1,000.)
        The idempotency key is bound to `bound_to`, the whole batch, when
        `items` are its part on this shard."""
        if not items:
            return succeed([])
        keys = self._keys
        key = bound = ""
        if idempotency_key is not None:
            key = keys.idempotency(idempotency_key)
            bound = fingerprint(b"n", items if bound_to is None else bound_to)
        args: list[Any] = [0, *self._history, self._meta_ttl, key, bound]
        for channel, run in groupby(items, itemgetter(0)):
            datas = [data for _, data in run]
            args += (
                keys.history(channel),
                keys.bus(channel),
                envelope_prefix(channel),
                len(datas),
                b"\n".join(datas),
            )
        return self._eval(PUBLISH_MANY, tuple(args), _published_many)

    def push(
        self, channel: str, entry: bytes, event_list: str, data: bytes
    ) -> Deferred[tuple[bool, Published]]:
        pieces = self._commands.get((channel, event_list)) or self._template(channel, event_list)
        started = monotonic()
        d = self._connection.execute(_fill(pieces, entry, data))
        args_of = self._push_args
        return d.addCallback(
            self._answered, started, PUSH, _pushed, args_of, channel, entry, event_list, data
        )

    def _answered(
        self,
        reply: Any,
        started: float,
        script: Script,
        then: Callable[[Any], T],
        args_of: Callable[..., tuple[Any, ...]],
        *given: Any,
    ) -> Any:
        """The reply to a templated command sent at `started` (time.monotonic):
        as `_evaluated`'s, the command's arguments made (`args_of(*given)`)
        only when it must be sent again."""
        self._timers[script].observe(monotonic() - started)
        if isinstance(reply, ReplyError):
            return self._evaluated(reply, script, args_of(*given), then)
        return _answer(then, reply)

    def _eval(self, script: Script, args: tuple[Any, ...], then: Callable[[Any], T]) -> Deferred[T]:
        """`then(reply)` of EVALSHA `script` `args` (numkeys, KEYS, ARGV)."""
        started = monotonic()
        d = self._connection.execute(pack_command(("EVALSHA", script.sha, *args)))
        d.addCallback(self._timed, script, started)
        return d.addCallback(self._evaluated, script, args, then)

    def _timed(self, reply: Any, script: Script, started: float) -> Any:
        self._timers[script].observe(monotonic() - started)
        return reply

    def _evaluated(
        self, reply: Any, script: Script, args: tuple[Any, ...], then: Callable[[Any], T]
    ) -> Any:
        if not isinstance(reply, ReplyError):
            return _answer(then, reply)
        message = str(reply)
        if message.startswith("NOSCRIPT"):
            d = self._connection.execute(pack_command(("EVAL", script.source, *args)))
            return d.addCallback(self._evaluated, script, args, then)
        if message.startswith("READONLY"):
            # A replica since a failover: the next connection finds the master.
            self._connection.reconnect()
        # An error reply: the script stopped before its first write.
        raise BrokerUnavailable(f"Redis: {message}")


#: Where a command template (`Publisher._template`) leaves room for bytes given per call.
_HOLE: Any = object()


def _bulk_strings(args: list[Any]) -> bytes:
    """`args` as RESP bulk strings, as hiredis packs them (without the array header)."""
    if not args:
        return b""
    packed: bytes = pack_command(tuple(args))
    return packed[packed.index(b"\r\n") + 2 :]


def _fill(pieces: tuple[bytes, ...], *values: bytes) -> bytes:
    """A template's pieces with each call's `values` as bulk strings between them."""
    parts = [pieces[0]]
    for value, piece in zip(values, pieces[1:], strict=True):
        parts += (b"$%d\r\n" % len(value), value, b"\r\n", piece)
    return b"".join(parts)


def _answer(then: Callable[[Any], T], reply: Any) -> T:
    """`then(reply)`; a reply not of the script's shape (not Redis, or a Redis
    that is not what it seems) leaves the outcome unknown (504), not a 500."""
    try:
        return then(reply)
    except (ValueError, TypeError, IndexError, AttributeError):
        raise OutcomeUnknown(
            f"Redis answered {str(reply)[:80]!r}, not the script's answer"
        ) from None


def _published(answer: list[Any]) -> Published:
    """publish.lua's {0|1|2, id}."""
    status, msg_id = answer
    if int(status) == 2:
        raise IdempotencyKeyReused("the Idempotency-Key was first used with another request")
    return Published(msg_id, repeated=int(status) == 1)


def _pushed(answer: list[Any]) -> tuple[bool, Published]:
    return True, _published(answer)


def _published_many(answer: str) -> list[Published]:
    """publish_many.lua's "<0|1|2>:<id>,<id>,..."."""
    status, _, ids = answer.partition(":")
    if status == "2":
        raise IdempotencyKeyReused("the Idempotency-Key was first used with another request")
    return [Published(msg_id, repeated=status == "1") for msg_id in ids.split(",")]
