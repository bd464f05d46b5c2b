"""Bounds on what one client may take: connections per address, publish rate."""

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
