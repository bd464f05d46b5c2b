"""The in-process broker: what pushd uses when no Redis is configured.

It keeps the Redis broker's promises inside one process: ids of the stream
form, strictly increasing per channel; a bounded, linked history per channel
that expires `history_ttl` seconds after its last message, its newest id
remembered past that (pushd.broker); idempotency keys bound to their request.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from pushd.broker import (
    BEGINNING,
    IDEMPOTENCY_TTL,
    Broker,
    History,
    IdempotencyKeyReused,
    PresenceChange,
    PresenceRead,
    Published,
    fingerprint,
    meta_ttl,
)
from pushd.broker.members import TOMBSTONE, split
from pushd.message import bus_payload, envelope, format_id, parse_id


class _Entry:
    __slots__ = ("data", "id", "key", "prev")

    def __init__(self, key: tuple[int, int], data: bytes, prev: str) -> None:
        self.key = key
        self.id = format_id(*key)
        self.data = data
        self.prev = prev


class _History:
    __slots__ = ("entries", "last", "prev", "touched")

    def __init__(self, size: int) -> None:
        self.entries: deque[_Entry] = deque(maxlen=size)
        self.last = (-1, 0)
        self.touched = 0.0
        #: What its first entry links to (pushd.broker).
        self.prev = ""


class MemoryBroker(Broker):
    def __init__(self, clock: Any, history_size: int, history_ttl: float) -> None:
        super().__init__()
        self._clock = clock
        self._history_size = history_size
        self._history_ttl = history_ttl
        self._histories: dict[str, _History] = {}
        self._subscribed: set[str] = set()
        #: Idempotency key -> (until, the request's fingerprint, the ids answered).
        self._seen: dict[str, tuple[float, str, list[str]]] = {}
        self._meta_ttl = meta_ttl(history_ttl)
        #: Channel -> (until, its newest id): kept past the history (pushd.broker).
        self._newest: dict[str, tuple[float, str]] = {}
        self._next_expiry = 0.0
        #: Channel -> client id -> stored member (pushd.broker.members).
        self._members: dict[str, dict[str, bytes]] = {}

    def _live_history(self, channel: str) -> _History | None:
        history = self._histories.get(channel)
        if history is not None and self._clock.seconds() - history.touched > self._history_ttl:
            del self._histories[channel]
            return None
        return history

    def _expire(self) -> None:
        now = self._clock.seconds()
        horizon = now - self._history_ttl
        for channel in [c for c, h in self._histories.items() if h.touched < horizon]:
            del self._histories[channel]
        for key in [k for k, (until, _, _) in self._seen.items() if until < now]:
            del self._seen[key]
        for channel in [c for c, (until, _) in self._newest.items() if until < now]:
            del self._newest[channel]

    def _remembered(self, channel: str) -> str:
        """The channel's newest id, even past its history; "" when none."""
        newest = self._newest.get(channel)
        return newest[1] if newest is not None and newest[0] >= self._clock.seconds() else ""

    def _repeat(self, key: str | None, bound: str) -> list[Published] | None:
        """The first answer to a request under `key` (None: not seen)."""
        if key is None:
            return None
        seen = self._seen.get(key)
        if seen is None or seen[0] < self._clock.seconds():
            return None
        if seen[1] != bound:
            raise IdempotencyKeyReused("the Idempotency-Key was first used with another request")
        return [Published(msg_id, repeated=True) for msg_id in seen[2]]

    def _remember(self, key: str | None, bound: str, published: list[Published]) -> None:
        if key is not None:
            until = self._clock.seconds() + IDEMPOTENCY_TTL
            self._seen[key] = (until, bound, [p.id for p in published])

    def publish(
        self, channel: str, data: bytes, idempotency_key: str | None = None
    ) -> Deferred[Published]:
        bound = "" if idempotency_key is None else fingerprint(b"1", [(channel, data)])
        try:
            repeated = self._repeat(idempotency_key, bound)
        except IdempotencyKeyReused as e:
            return fail(e)
        if repeated is not None:
            return succeed(repeated[0])
        published = self._publish(channel, data)
        self._remember(idempotency_key, bound, [published])
        return succeed(published)

    def _publish(self, channel: str, data: bytes) -> Published:
        now = self._clock.seconds()
        if (
            len(self._histories) + len(self._seen) + len(self._newest) > 1024
            and now >= self._next_expiry
        ):
            # At most once a second: remembered ids live a day, so a busy
            # process may hold many more than 1024 for good reason.
            self._next_expiry = now + 1
            self._expire()
        history = self._live_history(channel)
        if history is None:
            history = self._histories[channel] = _History(self._history_size)
            # A new history links to the channel's newest id and stays above it.
            history.prev = self._remembered(channel)
            if history.prev:
                history.last = parse_id(history.prev.lstrip("?"))
        history.touched = now
        ms = int(now * 1000)
        last_ms, last_seq = history.last
        seq = last_seq + 1 if ms <= last_ms else 0
        history.last = key = (max(ms, last_ms), seq)
        prev = history.entries[-1].id if history.entries else history.prev
        entry = _Entry(key, data, prev)
        history.entries.append(entry)
        self._newest[channel] = (now + self._meta_ttl, entry.id)
        if channel in self._subscribed:
            self._listener.receive(channel, bus_payload(envelope(channel, entry.id, data)))
        return Published(entry.id)

    def publish_many(
        self, items: list[tuple[str, bytes]], idempotency_key: str | None = None
    ) -> Deferred[list[Published]]:
        bound = "" if idempotency_key is None else fingerprint(b"n", items)
        try:
            repeated = self._repeat(idempotency_key, bound)
        except IdempotencyKeyReused as e:
            return fail(e)
        if repeated is not None:
            return succeed(repeated)
        published = [self._publish(channel, data) for channel, data in items]
        self._remember(idempotency_key, bound, published)
        return succeed(published)

    def push(
        self, channel: str, entry: bytes, event_list: str, data: bytes
    ) -> Deferred[tuple[bool, Published]]:
        return succeed((False, self._publish(channel, data)))

    def history(self, channel: str, since: str | None, limit: int | None) -> Deferred[History]:
        h = self._live_history(channel)
        entries = list(h.entries) if h is not None else []
        last = entries[-1].id if entries else None
        if since is None:
            picked = entries[-limit:] if limit else entries
            return succeed(History([(e.id, e.data) for e in picked], complete=False, last=last))
        after = parse_id(since)
        newer = [e for e in entries if e.key > after]
        # Linked entries: see pushd.broker.
        before = "" if since == BEGINNING else since
        if newer:
            complete = newer[0].prev == before
        elif last is not None:
            complete = last == since
        else:
            complete = before == "" and not self._remembered(channel)
        if limit is not None:
            newer = newer[:limit]
        return succeed(History([(e.id, e.data) for e in newer], complete, last))

    def last_id(self, channel: str) -> Deferred[str | None]:
        h = self._live_history(channel)
        return succeed(h.entries[-1].id if h is not None and h.entries else None)

    def subscriber_count(self, channel: str) -> Deferred[int]:
        return succeed(self._listener.count(channel))

    def control(self, command: dict[str, Any]) -> Deferred[int]:
        if command.get("cmd") == "destroy":
            channel = command["channel"]
            self._histories.pop(channel, None)
            # A tombstone: what comes next links to "?<id>" (pushd.broker).
            newest = self._remembered(channel)
            if newest:
                until = self._clock.seconds() + self._meta_ttl
                self._newest[channel] = (until, "?" + newest.lstrip("?"))
        self._listener.control(command)
        return succeed(1)

    def update_presence(self, changes: dict[str, PresenceChange]) -> Deferred[None]:
        for channel, change in changes.items():
            members = self._members.setdefault(channel, {})
            for client in change.leaves:
                members.pop(client, None)
            members.update(change.joins)
            if not members:
                del self._members[channel]
        return succeed(None)

    def presence(self, channel: str, limit: int) -> Deferred[PresenceRead]:
        members = [v for v in self._members.get(channel, {}).values() if v[:1] != TOMBSTONE]
        users = {user for user, _ in map(split, members) if user}
        return succeed(PresenceRead(len(members), len(users), members[:limit]))

    def announce(self, channel: str, payload: bytes) -> Deferred[None]:
        if channel in self._subscribed:
            self._listener.receive(channel, payload)
        return succeed(None)

    def leave_presence(self) -> Deferred[None]:
        self._members.clear()
        return succeed(None)

    def subscribe(self, channel: str) -> Deferred[None]:
        self._subscribed.add(channel)
        return succeed(None)

    def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    def when_ready(self) -> Deferred[None]:
        return succeed(None)

    def subscribed_channels(self) -> frozenset[str]:
        return frozenset(self._subscribed)
