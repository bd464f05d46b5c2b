"""Subscriber counts of all nodes.

Every node writes its own count into a hash per channel,
`<prefix>{<channel>}:subscribers` (field: node id, value
`<count>:<expiry ms>`), refreshing it every `refresh` seconds
(report_counts.lua); readers add up the fields that have not expired
(count.lua), so a dead node stops counting within `ttl` seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pushd.broker import BrokerUnavailable
from pushd.broker.redis.keys import Keys
from pushd.broker.redis.pool import CommandPool
from pushd.broker.redis.scripts import COUNT, REPORT_COUNTS

log = Logger()

#: Seconds between reports; every COUNTS_FULL_EVERY-th report writes every
#: channel's count, the others only the changed ones.
COUNTS_REFRESH = 1.0
COUNTS_FULL_EVERY = 2
#: Seconds a node's count lasts unless reported again: a dead node's
#: subscribers stop counting within this (`--node-ttl`).
NODE_TTL = 6.0
#: Channels a script call reports at most.
COUNTS_BATCH = 500


def refresh_every(ttl: float, most: float = COUNTS_REFRESH) -> float:
    """Seconds between refreshes of a node's entries that outlive it by `ttl`
    seconds (its counts, its presence): `most`, or a third of `ttl` when that
    is shorter, so two refreshes may be missed before the entries expire."""
    return min(most, ttl / 3)


class NodeCounts:
    """This node's counts (`local`: the hub's, per channel), reported every
    `refresh` seconds; all nodes' counts, read."""

    def __init__(
        self,
        reactor: IReactorTime,
        pool: CommandPool,
        keys: Keys,
        node: str,
        local: Callable[[], dict[str, int]],
        ttl: float = NODE_TTL,
        refresh: float = COUNTS_REFRESH,
    ) -> None:
        self._pool = pool
        self._keys = keys
        self._node = node
        self._local = local
        self._ttl_ms = int(ttl * 1000)
        self._refresh = refresh_every(ttl, refresh)
        self._reported: dict[str, int] = {}
        self._ticks = 0
        self._reporter = LoopingCall(self._tick)
        self._reporter.clock = reactor

    def start(self) -> None:
        self._reporter.start(self._refresh, now=False)

    async def stop(self) -> None:
        """Stop reporting, and leave the counts at once rather than when they expire."""
        if self._reporter.running:
            self._reporter.stop()
        if self._reported and self._pool.connected:
            with suppress(BrokerUnavailable):
                await self._report(dict.fromkeys(self._reported, 0))

    def subscriber_count(self, channel: str) -> Deferred[int]:
        async def run() -> int:
            return int(await self._pool.run(COUNT, [self._keys.subscribers(channel)], []))

        return Deferred.fromCoroutine(run())

    async def _report(self, counts: dict[str, int]) -> None:
        items = list(counts.items())
        for start in range(0, len(items), COUNTS_BATCH):
            batch = items[start : start + COUNTS_BATCH]
            await self._pool.run(
                REPORT_COUNTS,
                [self._keys.subscribers(channel) for channel, _ in batch],
                [self._node, self._ttl_ms, *(n for _, n in batch)],
            )

    async def report(self) -> None:
        """Write what changed since the last report (every count, every
        COUNTS_FULL_EVERY-th time); after a failure, everything next time."""
        current = self._local()
        self._ticks += 1
        if self._ticks % COUNTS_FULL_EVERY == 0:
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

    def _tick(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self.report())
        d.addErrback(lambda f: log.failure("reporting subscriber counts failed", f))
        return d
