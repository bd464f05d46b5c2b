"""Subscriber counts of all nodes.

Every node writes its own count into a hash per channel,
`<prefix>{<channel>}:subscribers` (field: node id, value
`<count>:<expiry ms>`), refreshing it every few seconds (report_counts.lua);
readers add up the fields that have not expired (count.lua), so a dead node
stops counting within seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from pushd.broker import Broker, BrokerUnavailable
from pushd.broker.redis.scripts import COUNT, REPORT_COUNTS, Script

log = Logger()

COUNTS_REFRESH = 1.0
COUNTS_FULL_EVERY = 2
COUNTS_TTL_MS = 6_000
COUNTS_BATCH = 500


class NodeCounts(Broker):
    """This node's counts, reported every COUNTS_REFRESH s; all nodes' counts, read."""

    # What it uses of RedisBroker (pushd.broker.redis.broker), which sets it up:
    node: str
    _reported: dict[str, int]
    _report_ticks: int
    _subscribers: Callable[[str], str]
    _run: Callable[[Script, Sequence[str], Sequence[Any]], Any]

    def subscriber_count(self, channel: str) -> Deferred[int]:
        async def run() -> int:
            return int(await self._run(COUNT, [self._subscribers(channel)], []))

        return Deferred.fromCoroutine(run())

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
