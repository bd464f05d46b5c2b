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

The bus is untrusted: any process may PUBLISH on `<prefix><channel>`. The
subscriber connection takes every payload as bytes (no decoding, no number
conversion), `_bus_received` lets nothing raise back into txredisapi's reply
parser, and the hub trusts only payloads in pushd's bus format, which every
script here PUBLISHes (pushd.message, BUS_MARKER).

Subscriber counts of all nodes: every node writes its own count into a hash per
channel, `<prefix>{<channel>}:subscribers` (field: node id, value
`<count>:<expiry ms>`), refreshing it every few seconds; readers add up the
fields that have not expired, so a dead node stops counting within seconds.
"""

from __future__ import annotations

import hashlib
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
    IdempotencyKeyReused,
    OutcomeUnknown,
    Published,
    fingerprint,
    meta_ttl,
)
from pushd.config import RedisAddress
from pushd.message import dump_json, envelope_prefix, load_json

log = Logger()


class Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


# The publish script ships as a file so that backends can run it too.
_PUBLISH_LUA = (files("pushd.broker") / "publish.lua").read_text()
PUBLISH = Script(_PUBLISH_LUA)

# A batch in one script, in order, all or nothing, a run of messages of one
# channel at a time: one history read, one EXPIRE and one PUBLISH per run (its
# envelopes one a line, which the hub splits), one XADD per message (linked as
# publish.lua links them). An envelope has no newline: compact JSON escapes it.
# Redis does not undo a script's writes when a command fails half-way, so
# everything that could fail (a key of another type) is read before the first write.
#   ARGV[1..4]  history size, history TTL, idempotency TTL, meta TTL
#   ARGV[5..6]  the batch's idempotency key ('' for none) and fingerprint
#   then per run, five arguments:
#               history stream, pub/sub channel, envelope start, count, the data one a line
# Returns "0:<id>,<id>,...", or "1:<ids>" when the idempotency key had been seen
# with this fingerprint, "2:" with another (both: nothing published).
PUBLISH_MANY = Script("""
local size, ttl, idem_ttl, meta_ttl, key, fp = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if key ~= '' then
  local seen = redis.call('GET', key)
  if seen then
    local bound, answer = string.match(seen, '^(%x*)|(.*)$')
    if bound ~= fp then return '2:' end
    return '1:' .. answer
  end
end
local newest, at = {}, {}
for r = 7, #ARGV, 5 do
  local stream = ARGV[r]
  if newest[stream] == nil then
    local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
    if last[1] then
      newest[stream] = last[1][1]
    else
      -- A new stream: linked as publish.lua links it, its ids above the meta key's.
      newest[stream] = ''
      local seen = redis.call('GET', string.sub(stream, 1, -9) .. ':meta')
      if seen then
        newest[stream] = seen
        local ms, seq = string.match(seen, '(%d+)-(%d+)$')
        local now = redis.call('TIME')
        if ms and tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) <= tonumber(ms) then
          at[stream] = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
        end
      else
        local base = string.match(stream, '^(.*){[^{}]*}:history$')
        if base and redis.call('EXISTS', base .. '!lost') == 1 then newest[stream] = '?' end
      end
    end
  end
end
local out = {}
for r = 7, #ARGV, 5 do
  local stream, channel, head = ARGV[r], ARGV[r + 1], ARGV[r + 2]
  local prev = newest[stream]
  local live = {}
  for data in string.gmatch(ARGV[r + 4], '[^\\n]+') do
    local id = redis.call('XADD', stream, 'MAXLEN', '~', size, at[stream] or '*',
      'd', data, 'p', prev)
    at[stream] = nil
    prev = id
    live[#live + 1] = head .. '"' .. id .. '","data":' .. data .. '}'
    out[#out + 1] = id
  end
  newest[stream] = prev
  redis.call('EXPIRE', stream, ttl)
  redis.call('SET', string.sub(stream, 1, -9) .. ':meta', prev, 'EX', meta_ttl)
  redis.call('PUBLISH', channel, '\\0pushd/1\\n' .. table.concat(live, '\\n'))
end
local answer = table.concat(out, ',')
if key ~= '' then redis.call('SET', key, fp .. '|' .. answer, 'EX', idem_ttl) end
return '0:' .. answer
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
return publish({KEYS[3]}, {unpack(ARGV, 2)})
"""
)

# KEYS: history stream, its meta key, <prefix>!lost (EPOCH); ARGV: since, count.
# Returns {complete, entries, the newest id or ''}. After "0-0" (from the
# beginning) the first entry must link to nothing, or, with no entry, the
# channel must have no remembered id either (see pushd.broker).
READ_AFTER = Script("""
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last = ''
if newest[1] then last = newest[1][1] end
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
local before = ARGV[1]
if before == '0-0' then before = '' end
local complete = 0
if entries[1] then
  local fields = entries[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'p' and fields[i + 1] == before then complete = 1 end
  end
elseif last ~= '' then
  if last == ARGV[1] then complete = 1 end
elseif before == '' and redis.call('EXISTS', KEYS[2], KEYS[3]) == 0 then
  complete = 1
end
return {complete, entries, last}
""")

# `destroy`: KEYS: history stream, subscriber hash, meta key; ARGV: meta TTL.
# The meta key becomes '?<newest id>': the next stream's first entry links to
# it, so no resume from before and no read from "0-0" says complete, and its
# ids stay above.
DESTROY = Script("""
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local newest = redis.call('GET', KEYS[3])
if last[1] then newest = last[1][1] end
redis.call('DEL', KEYS[1], KEYS[2])
if newest then
  redis.call('SET', KEYS[3], '?' .. string.match(newest, '[^?]*$'), 'EX', ARGV[1])
end
return 1
""")

# Did Redis lose its data (restarted empty, flushed) since this node last saw
# it? KEYS: <prefix>!epoch (a token no node ever deletes), <prefix>!lost;
# ARGV: the token this node saw ('' at first), a new token, the meta TTL.
# When the token is gone or another, <prefix>!lost is set for as long as a
# channel's newest id would have been remembered: meanwhile the first message
# of a new stream links to '?' (something may be missing before it), and
# reading after "0-0" a channel with no history is not complete.
EPOCH = Script("""
local current = redis.call('GET', KEYS[1])
if not current then
  current = ARGV[2]
  redis.call('SET', KEYS[1], current)
end
if ARGV[1] ~= '' and current ~= ARGV[1] then
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
end
return current
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
        self.broker._bus_received(channel, message)


class _SubscriberFactory(txredisapi.SubscriberFactory):
    protocol = _Subscriber

    def __init__(self, broker: RedisBroker) -> None:
        super().__init__(isLazy=True)
        self.broker = broker
        # Payloads are bytes, whatever they hold: no decoding (charset), and no
        # number conversion, which would turn a `PUBLISH pushd:c 123` into an
        # int (and "1.50" into 1.5) before pushd sees it.
        self.charset = None
        self.convertNumbers = False

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
        self.node = uuid.uuid4().hex[:16]
        self._reactor = reactor
        self._address = address
        self._prefix = prefix
        self._prefix_bytes = prefix.encode()
        self._pool_size = pool_size
        self._timeout = timeout
        self._history_size = history_size
        self._history_args = (str(history_size), str(history_ttl), str(IDEMPOTENCY_TTL))
        self._meta_ttl = str(meta_ttl(history_ttl))
        self._epoch = ""
        self._lost = f"{prefix}!lost"
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

    def _meta(self, channel: str) -> str:
        """The channel's newest id, kept past its history (publish.lua derives it)."""
        return f"{self._prefix}{{{channel}}}:meta"

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

    async def _check_epoch(self) -> None:
        """Once connected (again): has Redis lost its data since? (EPOCH)"""
        await self.when_ready()
        keys = [f"{self._prefix}!epoch", self._lost]
        with suppress(BrokerUnavailable):  # lost again: the next connection asks
            self._epoch = await self._run(
                EPOCH, keys, [self._epoch, uuid.uuid4().hex, self._meta_ttl]
            )

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

    def history(self, channel: str, since: str | None, limit: int | None) -> Deferred[History]:
        async def run() -> History:
            count = limit or self._history_size * 2 + 100
            stream = self._stream(channel)
            if since is None:
                newest = await self._call(
                    "execute_command", "XREVRANGE", stream, "+", "-", "COUNT", count
                )
                last = newest[0][0] if newest else None
                return History(_messages(newest[::-1]), complete=False, last=last)
            complete, entries, last = await self._run(
                READ_AFTER, [stream, self._meta(channel), self._lost], [since, count]
            )
            return History(_messages(entries), complete=bool(int(complete)), last=last or None)

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
                keys = [self._stream(channel), self._subscribers(channel), self._meta(channel)]
                await self._run(DESTROY, keys, [self._meta_ttl])
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
        """A payload on one of pushd's own channels (`!control`, this node's
        `!reply:`): any process may PUBLISH there too, so anything that is not
        a command object is ignored."""
        body = _loads(raw)
        if not isinstance(body, dict):
            return
        request = body.get("id")
        if name == self._control_channel[len(self._prefix) :]:
            acted = self._listener.control(body)
            reply = body.get("reply")
            if (
                isinstance(reply, str)
                and reply.startswith(self._prefix + "!reply:")
                and isinstance(request, str)
            ):
                answer = dump_json({"id": request, "acted": acted})
                self._pool.publish(reply, answer).addErrback(_log_failure, "PUBLISH")
        elif name == self._reply_channel[len(self._prefix) :] and isinstance(request, str):
            waiting = self._replies.get(request)
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
        current = self._listener.channels()
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
                if again:
                    self._listener.resume(channel)

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
        Deferred.fromCoroutine(self._check_epoch()).addErrback(_log_failure, "EPOCH")

    def _disconnected(self, proto: _Subscriber) -> None:
        if self._proto is proto:
            if self.running:
                log.warn("Redis subscriber connection lost; reconnecting")
            self._proto = None
            self._active.clear()
            self._sent.clear()

    def _bus_received(self, channel: bytes, payload: bytes) -> None:
        """A payload the subscriber connection received (txredisapi's
        `messageReceived`): a command on pushd's own channels, or a bus payload
        for `BusListener.receive` (`Hub.receive`), whatever its bytes. This runs inside
        txredisapi's reply parser: nothing may raise out of it, or the
        connection, and every other message of the same read, would be lost."""
        name = ""
        try:
            if not channel.startswith(self._prefix_bytes):
                return
            name = channel[len(self._prefix_bytes) :].decode("utf-8", "replace")
            if not isinstance(payload, bytes):  # txredisapi converted it after all
                payload = str(payload).encode()
            if name.startswith("!"):
                self._command(name, payload)
            # A message published before our UNSUBSCRIBE reached Redis may still come.
            elif name in self._wanted:
                self._listener.receive(name, payload)
        except Exception:
            self._listener.bus_error("control" if name.startswith("!") else "receive", name)


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


def _loads(raw: bytes) -> Any:
    try:
        return load_json(raw)
    except ValueError:
        return None


def _messages(entries: list[Any]) -> list[tuple[str, bytes]]:
    """XRANGE entries `[id, [field, value, ...]]` as (id, data JSON)."""
    messages = []
    for msg_id, fields in entries:
        values = dict(zip(fields[::2], fields[1::2], strict=True))
        messages.append((msg_id, _stored_data(values.get("d"))))
    return messages


def _stored_data(data: Any) -> bytes:
    """An entry's `d` as strict, one-line JSON. pushd stores nothing else, but
    any process can XADD: what is not strict JSON is delivered as its text (a
    JSON string), and JSON with a line break is written again on one line."""
    if data is None:
        return b"null"
    text = data if isinstance(data, str) else bytes(data).decode("utf-8", "replace")
    try:
        value = load_json(text)
    except (ValueError, RecursionError):
        return dump_json(text)
    if "\n" in text or "\r" in text:
        return dump_json(value)
    return text.encode()


def _log_failure(failure: Any, what: str) -> None:
    if not failure.check(txredisapi.ConnectionError):
        log.failure("Redis {what} failed", failure, what=what)
