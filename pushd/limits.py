"""Bounds on what one client may take: connections per address, publish rate,
bytes waiting to be sent."""

from __future__ import annotations

from typing import Any


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; one token per message."""

    __slots__ = ("_burst", "_clock", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: int, clock: Any) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock.seconds()

    def take(self) -> bool:
        now = self._clock.seconds()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class KeyedBuckets:
    """A TokenBucket per key (a token: the HTTP publishes of one browser client
    share its rate, as a WebSocket's publishes share their connection's).
    Bounded: past `max_keys`, keys whose bucket has refilled (idle for
    burst/rate seconds: forgetting them changes nothing) or whose `expires`
    has passed are dropped; a table still full of busy keys refuses new ones."""

    def __init__(self, rate: float, burst: int, clock: Any, max_keys: int = 100_000) -> None:
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._refill = burst / rate
        # key -> (bucket, last take, expires or None)
        self._buckets: dict[str, tuple[TokenBucket, float, float | None]] = {}

    def take(self, key: str, expires: float | None = None) -> bool:
        now = self._clock.seconds()
        entry = self._buckets.get(key)
        if entry is None:
            if len(self._buckets) >= self._max_keys:
                self._sweep(now)
                if len(self._buckets) >= self._max_keys:
                    return False
            bucket = TokenBucket(self._rate, self._burst, self._clock)
        else:
            bucket = entry[0]
        self._buckets[key] = (bucket, now, expires)
        return bucket.take()

    def _sweep(self, now: float) -> None:
        for key, (_, last, expires) in list(self._buckets.items()):
            if now - last >= self._refill or (expires is not None and expires <= now):
                del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


class ConnectionCounter:
    """Open connections per client address, all transports together."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def acquire(self, address: str) -> bool:
        n = self._counts.get(address, 0)
        if n >= self.limit:
            return False
        self._counts[address] = n + 1
        return True

    def release(self, address: str) -> None:
        n = self._counts.get(address, 0) - 1
        if n > 0:
            self._counts[address] = n
        else:
            self._counts.pop(address, None)

    def count(self, address: str) -> int:
        return self._counts.get(address, 0)

    def __len__(self) -> int:
        return len(self._counts)


class SendBound:
    """The slow-consumer bound, as the transport's IPushProducer: Twisted pauses
    it once its own buffer is full; from then on the bytes queued for the
    client are counted, and `over` says when they pass the bound. History
    being replayed (`replaying`) is not counted: --history-size bounds it."""

    __slots__ = ("_backlog", "_paused", "replaying")
    _backlog: int
    _paused: bool
    replaying: bool

    def pauseProducing(self) -> None:
        # Twisted calls this on every write while the buffer is over its mark.
        if not self._paused:
            self._paused = True
            self._backlog = 0

    def resumeProducing(self) -> None:
        self._paused = False

    def over(self, size: int, limit: int) -> bool:
        if not self._paused or self.replaying:
            return False
        self._backlog += size
        return self._backlog > limit
