"""The Redis broker: one command pool and one subscriber connection per process.

Publishing runs one Lua script: XADD to the channel's history stream (each
entry links to the one before it), EXPIRE, PUBLISH of the envelope with the
stream id, and the idempotency record; so a message is stored and sent
atomically, or not at all. Scripts run with EVALSHA and are loaded again after
a NOSCRIPT (Redis restarted, SCRIPT FLUSH).

Subscriptions: txredisapi reconnects a lost subscriber connection but does not
re-subscribe (library findings, 4), so the broker keeps the set of channels the
hub wants and subscribes them again on every new connection. Each SUBSCRIBE
names one channel: txredisapi matches a multi-channel SUBSCRIBE's confirmations
to the wrong waiters.

Subscriber counts of all nodes: every node writes its own count into a hash per
channel, `<prefix>{<channel>}:subscribers` (field: node id, value
`<count>:<expiry ms>`), refreshing it every few seconds; readers add up the
fields that have not expired, so a dead node stops counting within seconds.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from contextlib import suppress
from functools import lru_cache
from importlib.resources import files
from itertools import groupby
from operator import itemgetter
from typing import Any

import txredisapi
from twisted.internet import endpoints
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    fail,
    gatherResults,
    succeed,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pushd.broker import (
    IDEMPOTENCY_TTL,
    Broker,
    BrokerUnavailable,
    History,
    Listener,
    Published,
)
from pushd.config import RedisAddress
from pushd.message import dump_json, envelope_prefix

log = Logger()


def _as_is(reply: Any) -> Any:
    return reply


class Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


# The publish script ships as a file so that backends can run it too.
_PUBLISH_LUA = (files("pushd.broker") / "publish.lua").read_text()
PUBLISH = Script(_PUBLISH_LUA)

# Many publishes in one script, in order, a run of messages of one channel at
# a time: one history read, one EXPIRE and one PUBLISH per run (its envelopes
# one a line, which the hub splits), one XADD per message (linked as
# publish.lua links them). An envelope has no newline: compact JSON escapes it.
#   ARGV[1..3]  history size, history TTL, idempotency TTL
#   ARGV[4]     the batch's idempotency key ('' for none): item i is <prefix>idempotency:<key>#i
#   ARGV[5]     the index of this chunk's first item; then per run, five arguments:
#               history stream, pub/sub channel, envelope start, count, the data one a line
# Returns "<0|1>:<id>,..." for every item (1: its idempotency key had been seen).
PUBLISH_MANY = Script("""
local size, ttl, idem_ttl, key, index = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local out = {}
for r = 6, #ARGV, 5 do
  local stream, channel, head = ARGV[r], ARGV[r + 1], ARGV[r + 2]
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  local prev = ''
  if last[1] then prev = last[1][1] end
  local live = {}
  for data in string.gmatch(ARGV[r + 4], '[^\\n]+') do
    local seen, idem = false, nil
    if key ~= '' then
      idem = key .. '#' .. index
      seen = redis.call('GET', idem)
    end
    if seen then
      out[#out + 1] = '1:' .. seen
    else
      local id = redis.call('XADD', stream, 'MAXLEN', '~', size, '*', 'd', data, 'p', prev)
      prev = id
      live[#live + 1] = head .. '"' .. id .. '","data":' .. data .. '}'
      if idem then redis.call('SET', idem, id, 'EX', idem_ttl) end
      out[#out + 1] = '0:' .. id
    end
    index = index + 1
  end
  if #live > 0 then
    redis.call('EXPIRE', stream, ttl)
    redis.call('PUBLISH', channel, table.concat(live, '\\n'))
  end
end
return table.concat(out, ',')
""")

# The nginx+Lua gateway's store and a publish, atomically (as MULTI/EXEC would):
# `LPUSH <channel> <entry>`, `LPUSH <event list> <channel>`, then publish.lua.
#   KEYS[1] the list (the channel's name), KEYS[2] the event list, KEYS[3] the history stream
#   ARGV[1] the entry, then publish.lua's ARGV
PUSH = Script(
    "local function publish(KEYS, ARGV)\n"
    + _PUBLISH_LUA
    + """end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[2], KEYS[1])
return publish({KEYS[3]}, {ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]})
"""
)
BATCH_CHUNK = 1000

# KEYS: history stream; ARGV: since, count. Returns {complete, entries}.
READ_AFTER = Script("""
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
local complete = 0
if entries[1] then
  local fields = entries[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'p' and fields[i + 1] == ARGV[1] then complete = 1 end
  end
else
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if last[1] and last[1][1] == ARGV[1] then complete = 1 end
end
return {complete, entries}
""")

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: subscriber hashes; ARGV: node id, ttl ms, one count per key.
REPORT_COUNTS = Script(
    _NOW_MS
    + """
local expiry = now + tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  local n = tonumber(ARGV[i + 2])
  if n > 0 then
    redis.call('HSET', key, ARGV[1], n .. ':' .. expiry)
    redis.call('PEXPIRE', key, ARGV[2])
  else
    redis.call('HDEL', key, ARGV[1])
  end
end
return #KEYS
"""
)

# KEYS: subscriber hash. Adds up the live fields, drops the expired ones.
COUNT = Script(
    _NOW_MS
    + """
local all = redis.call('HGETALL', KEYS[1])
local sum = 0
for i = 1, #all, 2 do
  local n, expiry = string.match(all[i + 1], '(%d+):(%d+)')
  if n and tonumber(expiry) >= now then
    sum = sum + tonumber(n)
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return sum
"""
)

CONTROL_TIMEOUT = 2.0
COUNTS_REFRESH = 1.0
COUNTS_FULL_EVERY = 2
COUNTS_TTL_MS = 6_000
COUNTS_BATCH = 500


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


class _Replies:
    """The nodes' answers to one command; `all` fires once every node answered."""

    def __init__(self) -> None:
        self.count = 0
        self.expected: int | None = None
        self.all: Deferred[None] = Deferred()

    def expect(self, nodes: int) -> None:
        self.expected = nodes
        self._check()

    def add(self) -> None:
        self.count += 1
        self._check()

    def _check(self) -> None:
        if self.expected is not None and self.count >= self.expected and not self.all.called:
            self.all.callback(None)


class _Subscriber(txredisapi.SubscriberProtocol):
    broker: RedisBroker

    def connectionMade(self) -> Any:
        d = super().connectionMade()
        self.whenConnected().addCallback(self.broker._connected)
        return d

    def connectionLost(self, reason: Any) -> None:
        self.broker._disconnected(self)
        super().connectionLost(reason)

    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        self.broker._received(channel, message)


class _SubscriberFactory(txredisapi.SubscriberFactory):
    protocol = _Subscriber

    def __init__(self, broker: RedisBroker) -> None:
        super().__init__(isLazy=True)
        self.broker = broker
        # Payloads go to the clients as they are: keep them bytes.
        self.charset = None

    def buildProtocol(self, addr: Any) -> _Subscriber:
        p = super().buildProtocol(addr)
        p.broker = self.broker
        return p


class RedisBroker(Broker):
    def __init__(
        self,
        reactor: Any,
        address: RedisAddress,
        *,
        prefix: str = "pushd:",
        pool_size: int = 10,
        timeout: float = 5.0,
        history_size: int = 100,
        history_ttl: int = 3600,
        sentinel: tuple[tuple[tuple[str, int], ...], str | None] | None = None,
    ) -> None:
        super().__init__()
        self._sentinel_config = sentinel
        self._sentinel: Any = None
        self.listener: Listener | None = None
        self.node = uuid.uuid4().hex[:16]
        self._reactor = reactor
        self._address = address
        self._prefix = prefix
        self._prefix_bytes = prefix.encode()
        self._pool_size = pool_size
        self._timeout = timeout
        self._history_size = history_size
        self._history_args = (str(history_size), str(history_ttl), str(IDEMPOTENCY_TTL))
        self._pool: Any = None
        self._pool_factory: Any = None
        self._sub_factory: Any = None
        self._proto: _Subscriber | None = None
        self._wanted: set[str] = set()
        self._active: set[str] = set()
        self._sent: dict[str, object] = {}
        self._waiters: dict[str, list[Deferred[None]]] = {}
        self._ready_waiters: list[Deferred[None]] = []
        self._reported: dict[str, int] = {}
        self._report_ticks = 0
        # The application's commands reach every node on one pub/sub channel of the
        # subscriber connection ("!" is in no channel name); each node answers on
        # a reply channel of its own.
        self._control_channel = f"{prefix}!control"
        self._reply_channel = f"{prefix}!reply:{self.node}"
        self._replies: dict[str, _Replies] = {}
        self._reporter = LoopingCall(self._report_counts)
        self._reporter.clock = reactor
        self._stuck: dict[Any, Any] = {}
        self._watchdog = LoopingCall(self._check_stuck)
        self._watchdog.clock = reactor

    # -- keys

    def _stream(self, channel: str) -> str:
        return f"{self._prefix}{{{channel}}}:history"

    def _subscribers(self, channel: str) -> str:
        return f"{self._prefix}{{{channel}}}:subscribers"

    # -- life cycle

    def _endpoint(self) -> Any:
        return endpoints.clientFromString(self._reactor, self._address.endpoint())

    def startService(self) -> None:
        super().startService()
        a = self._address
        options = {
            "isLazy": True,
            "password": a.password,
            "username": a.username,
            "replyTimeout": self._timeout or None,
            "convertNumbers": False,
        }
        self._sub_factory = _SubscriberFactory(self)
        self._sub_factory.password = a.password
        self._sub_factory.username = a.username
        if self._sentinel_config is not None:
            sentinels, master = self._sentinel_config
            self._sentinel = txredisapi.Sentinel(list(sentinels))
            self._pool = self._sentinel.master_for(
                master, dbid=a.db, poolsize=self._pool_size, **options
            )
            self._pool_factory = self._pool._factory
            _fast_commands(self._pool_factory)
            # txredisapi has no Sentinel subscriber: give ours what its
            # Sentinel endpoint asks of a factory (it looks the master up
            # before every connection attempt).
            self._sub_factory.sentinel_manager = self._sentinel
            self._sub_factory.service_name = master
            self._sub_factory.is_master = True
            self._sub_factory.startConnecting(txredisapi._SentinelEndpoint(self._sub_factory))
        else:
            self._pool_factory = txredisapi.RedisFactory(None, a.db, self._pool_size, **options)
            _fast_commands(self._pool_factory)
            self._pool_factory.startConnecting(self._endpoint())
            self._pool = self._pool_factory.handler
            self._sub_factory.startConnecting(self._endpoint())
        self._pool_factory.deferred.addCallback(self._check_ready)
        self._reporter.start(COUNTS_REFRESH, now=False)
        if self._timeout:
            self._watchdog.start(self._timeout, now=False)

    async def _stop(self) -> None:
        await self.drain()
        self._reporter.stop()
        if self._watchdog.running:
            self._watchdog.stop()
        if self._reported and self.connected:
            # Leave the counts at once rather than when they expire.
            with suppress(BrokerUnavailable):
                await self._report(dict.fromkeys(self._reported, 0))
        await gatherResults(
            [self._pool_factory.disconnect(), self._sub_factory.disconnect()],
            consumeErrors=True,
        )
        if self._sentinel is not None:
            await self._sentinel.disconnect()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    @property
    def connected(self) -> bool:
        return bool(self._pool_factory and self._pool_factory.size) and self._proto is not None

    def when_ready(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._ready_waiters.append(d)
        self._check_ready()
        return d

    def _check_ready(self, _: object = None) -> object:
        if self.connected:
            waiters, self._ready_waiters = self._ready_waiters, []
            for d in waiters:
                d.callback(None)
        return _

    # -- commands

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
        self, channel: str, data: bytes, idempotency_key: str | None
    ) -> tuple[list[str], list[Any]]:
        keys = [self._stream(channel)]
        if idempotency_key is not None:
            keys.append(f"{self._prefix}idempotency:{idempotency_key}")
        args = [self._prefix + channel, envelope_prefix(channel), data, *self._history_args]
        return keys, args

    def publish(
        self, channel: str, data: bytes, idempotency_key: str | None = None
    ) -> Deferred[Published]:
        keys, args = self._publish_args(channel, data, idempotency_key)
        command = None
        if idempotency_key is None:
            # Everything but the data is the same for every publish to a channel.
            command = _fill(self._publish_command(channel), data)
        return self.track(self._eval(PUBLISH, keys, args, _published, command))

    @lru_cache(maxsize=4096)  # noqa: B019 (the broker lives as long as the process)
    def _publish_command(self, channel: str) -> tuple[bytes, ...]:
        """EVALSHA of publish.lua for `channel`, in RESP, around the data."""
        keys, args = self._publish_args(channel, _HOLE, None)
        return _template("EVALSHA", PUBLISH.sha, len(keys), *keys, *args)

    def _eval(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[Any],
        then: Callable[[Any], Any] = _as_is,
        command: bytes | None = None,
    ) -> Deferred[Any]:
        """`then(reply)` of EVALSHA on the pool's first free connection, as txredisapi's handle
        would pick it, but without txredisapi's command machinery (three
        Deferreds and a timer per command): the command is written and the next
        reply taken from the connection's own reply queue, which is all that
        machinery does. Publishing is the hot path. A reply that never comes is
        the watchdog's (`_check_stuck`), not a timer's per command."""
        factory = self._pool_factory
        free = factory.connectionQueue.pending if factory is not None else ()
        if not free or not free[0].connected:
            return Deferred.fromCoroutine(self._run(script, keys, args)).addCallback(then)
        conn = free[0]
        if command is None:
            try:
                command = conn._build_command("EVALSHA", script.sha, len(keys), *keys, *args)
            except txredisapi.RedisError as e:
                return fail(BrokerUnavailable(f"Redis: {e}"))
        d: Deferred[Any] = conn.replyQueue.get()
        conn.transport.write(command)
        return d.addCallback(self._evaluated, script, keys, args, then)

    def _evaluated(
        self,
        reply: Any,
        script: Script,
        keys: Sequence[str],
        args: Sequence[Any],
        then: Callable[[Any], Any],
    ) -> Any:
        if not isinstance(reply, Exception):
            return then(reply)
        if isinstance(reply, txredisapi.ResponseError) and str(reply).startswith("NOSCRIPT"):
            return Deferred.fromCoroutine(self._run(script, keys, args)).addCallback(then)
        if isinstance(reply, txredisapi.RedisError):  # lost, timed out, or an error reply
            raise BrokerUnavailable(f"Redis: {reply}")
        raise reply

    def _check_stuck(self) -> None:
        """Every `--redis-timeout`: a pool connection whose oldest unanswered
        command was already its oldest a tick ago is cut; what waits on it fails
        (503) and the pool connects again."""
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

    def publish_many(
        self, items: list[tuple[str, bytes]], idempotency_key: str | None = None
    ) -> Deferred[list[Published]]:
        async def run() -> list[Published]:
            published: list[Published] = []
            # Chunks one after the other: a script blocks Redis while it runs.
            for start in range(0, len(items), BATCH_CHUNK):
                key = (
                    ""
                    if idempotency_key is None
                    else f"{self._prefix}idempotency:{idempotency_key}"
                )
                args: list[Any] = [*self._history_args, key, start]
                for channel, run in groupby(items[start : start + BATCH_CHUNK], itemgetter(0)):
                    datas = [data for _, data in run]
                    args += (
                        self._stream(channel),
                        self._prefix + channel,
                        envelope_prefix(channel),
                        len(datas),
                        b"\n".join(datas),
                    )
                answer = await self._eval(PUBLISH_MANY, (), args)
                published += [Published(a[2:], repeated=a[0] == "1") for a in answer.split(",")]
            return published

        return self.track(Deferred.fromCoroutine(run()))

    def push(
        self, channel: str, entry: bytes, event_list: str, data: bytes
    ) -> Deferred[tuple[bool, Published]]:
        keys, args = self._publish_args(channel, data, None)
        command = _fill(self._push_command(channel, event_list), entry, data)
        d = self._eval(PUSH, [channel, event_list, *keys], [entry, *args], _pushed, command)
        return self.track(d)

    @lru_cache(maxsize=4096)  # noqa: B019 (the broker lives as long as the process)
    def _push_command(self, channel: str, event_list: str) -> tuple[bytes, ...]:
        """EVALSHA of PUSH for `channel` in RESP, around the entry and the data."""
        keys, args = self._publish_args(channel, _HOLE, None)
        return _template(
            "EVALSHA", PUSH.sha, len(keys) + 2, channel, event_list, *keys, _HOLE, *args
        )

    def history(self, channel: str, since: str | None, limit: int | None) -> Deferred[History]:
        async def run() -> History:
            count = limit or self._history_size * 2 + 100
            if since is None:
                newest = await self._call(
                    "execute_command", "XREVRANGE", self._stream(channel), "+", "-", "COUNT", count
                )
                return History(_messages(newest[::-1]), complete=False)
            complete, entries = await self._run(READ_AFTER, [self._stream(channel)], [since, count])
            return History(_messages(entries), complete=bool(int(complete)))

        return Deferred.fromCoroutine(run())

    def last_id(self, channel: str) -> Deferred[str | None]:
        async def run() -> str | None:
            last = await self._call(
                "execute_command", "XREVRANGE", self._stream(channel), "+", "-", "COUNT", 1
            )
            return last[0][0] if last else None

        return Deferred.fromCoroutine(run())

    def subscriber_count(self, channel: str) -> Deferred[int]:
        async def run() -> int:
            return int(await self._run(COUNT, [self._subscribers(channel)], []))

        return Deferred.fromCoroutine(run())

    # -- the application's commands

    def control(self, command: dict[str, Any]) -> Deferred[int]:
        async def run() -> int:
            if command.get("cmd") == "destroy":
                channel = command["channel"]
                await self._call(
                    "execute_command", "DEL", self._stream(channel), self._subscribers(channel)
                )
            request = uuid.uuid4().hex
            waiting = self._replies[request] = _Replies()
            body = dump_json({**command, "id": request, "reply": self._reply_channel})
            try:
                # PUBLISH answers how many nodes got the command: wait for that many replies.
                waiting.expect(int(await self._call("publish", self._control_channel, body)))
                await waiting.all.addTimeout(CONTROL_TIMEOUT, self._reactor)
            except TimeoutError:
                log.warn("{n} nodes answered a command in time", n=waiting.count)
            finally:
                del self._replies[request]
            return waiting.count

        return self.track(Deferred.fromCoroutine(run()))

    def _command(self, name: str, raw: bytes) -> None:
        body = _loads(raw)
        if not isinstance(body, dict):
            return
        if name == self._control_channel[len(self._prefix) :]:
            acted = self.on_control(body) if self.on_control is not None else 0
            reply = body.get("reply")
            if isinstance(reply, str) and reply.startswith(self._prefix + "!reply:"):
                answer = dump_json({"id": body.get("id"), "acted": acted})
                self._pool.publish(reply, answer).addErrback(_log_failure, "PUBLISH")
        elif name == self._reply_channel[len(self._prefix) :]:
            waiting = self._replies.get(body.get("id"))  # type: ignore[arg-type]
            if waiting is not None:
                waiting.add()

    # -- subscriber counts of this node

    async def _report(self, counts: dict[str, int]) -> None:
        items = list(counts.items())
        for start in range(0, len(items), COUNTS_BATCH):
            batch = items[start : start + COUNTS_BATCH]
            await self._run(
                REPORT_COUNTS,
                [self._subscribers(channel) for channel, _ in batch],
                [self.node, COUNTS_TTL_MS, *(n for _, n in batch)],
            )

    async def _report_counts_async(self) -> None:
        current = self.local_counts() if self.local_counts is not None else {}
        self._report_ticks += 1
        if self._report_ticks % COUNTS_FULL_EVERY == 0:
            changes = dict(current)
        else:
            changes = {c: n for c, n in current.items() if self._reported.get(c) != n}
        changes.update((c, 0) for c in self._reported if c not in current)
        if not changes:
            return
        try:
            await self._report(changes)
        except BrokerUnavailable:
            self._reported = {}
            return
        self._reported = current

    def _report_counts(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._report_counts_async())
        d.addErrback(lambda f: log.failure("reporting subscriber counts failed", f))
        return d

    # -- subscriptions

    def subscribe(self, channel: str) -> Deferred[None]:
        if channel in self._active:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.setdefault(channel, []).append(d)
        if channel not in self._wanted:
            self._wanted.add(channel)
            if self._proto is not None:
                self._send_subscribe(self._proto, channel)
        return d

    def unsubscribe(self, channel: str) -> None:
        if channel not in self._wanted:
            return
        self._wanted.discard(channel)
        self._active.discard(channel)
        self._sent.pop(channel, None)
        self._release(channel)
        if self._proto is not None:
            self._proto.unsubscribe(self._prefix + channel).addErrback(_log_failure, "UNSUBSCRIBE")

    def subscribed_channels(self) -> frozenset[str]:
        return frozenset(self._active)

    def _send_subscribe(self, proto: _Subscriber, channel: str, again: bool = False) -> None:
        token = self._sent[channel] = object()

        def confirmed(_: object) -> None:
            if self._proto is proto and self._sent.get(channel) is token:
                self._active.add(channel)
                self._release(channel)
                if again and self.resumed is not None:
                    self.resumed(channel)

        proto.subscribe(self._prefix + channel).addCallbacks(
            confirmed, _log_failure, errbackArgs=("SUBSCRIBE",)
        )

    def _release(self, channel: str) -> None:
        for d in self._waiters.pop(channel, ()):
            d.callback(None)

    def _connected(self, proto: _Subscriber) -> None:
        log.info("Redis subscriber connected; subscribing {n} channels", n=len(self._wanted))
        self._proto = proto
        self._active.clear()
        for own in (self._control_channel, self._reply_channel):
            proto.subscribe(own).addErrback(_log_failure, "SUBSCRIBE")
        for channel in self._wanted:
            self._send_subscribe(proto, channel, again=True)
        self._check_ready()

    def _disconnected(self, proto: _Subscriber) -> None:
        if self._proto is proto:
            if self.running:
                log.warn("Redis subscriber connection lost; reconnecting")
            self._proto = None
            self._active.clear()
            self._sent.clear()

    def _received(self, channel: bytes, message: bytes) -> None:
        if self.listener is not None and channel.startswith(self._prefix_bytes):
            name = channel[len(self._prefix_bytes) :].decode("utf-8", "replace")
            if name.startswith("!"):
                self._command(name, message)
                return
            # A message published before our UNSUBSCRIBE reached Redis may still come.
            if name in self._wanted:
                self.listener(name, message)


def _published(answer: list[Any]) -> Published:
    repeated, msg_id = answer
    return Published(msg_id, repeated=bool(int(repeated)))


def _pushed(answer: list[Any]) -> tuple[bool, Published]:
    return True, _published(answer)


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _messages(entries: list[Any]) -> list[tuple[str, bytes]]:
    """XRANGE entries `[id, [field, value, ...]]` as (id, data JSON)."""
    messages = []
    for msg_id, fields in entries:
        values = dict(zip(fields[::2], fields[1::2], strict=True))
        data = values.get("d", "null")
        messages.append((msg_id, data.encode() if isinstance(data, str) else dump_json(data)))
    return messages


def _log_failure(failure: Any, what: str) -> None:
    if not failure.check(txredisapi.ConnectionError):
        log.failure("Redis {what} failed", failure, what=what)
