"""The subscription reads of one node, shared by the subscribers that ask the same.

Each subscription makes ONE read of the broker once it has joined its channel
live (pushd.session): with `since`, the history after it; without, the
channel's newest id. When thousands of clients come back together (a node
restarted, a load balancer moved them), they ask the same thing: the same
channel, after the same id. `SharedReads` sends the reads asked in one reactor
turn for the same channel and starting point as one read, at the end of that
turn, and answers them all with one `Replay`: the history's messages made once
(each envelope serialised once, each frame made once, by the first transport
that sends it) and handed to every subscriber as the same object, as a live
fan-out is.

Sent at the end of the turn, the read is made after each of its subscribers
joined the channel live, which the session's cut needs (pushd.session: every
message the read did not see reaches the session live). A read is never shared
with a subscriber that asks after it was sent.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from pushd.broker import Broker, History
from pushd.message import Burst, Delivery, Message

log = Logger()


class Replay:
    """One read's answer, for every subscriber that asked it: the `history`,
    its `messages` made once, and `delivery`, the one object a transport is
    handed for all of them (a Message, a Burst, or None: nothing to replay)."""

    __slots__ = ("delivery", "history", "messages")

    def __init__(self, channel: str, history: History) -> None:
        self.history = history
        self.messages = [Message.stored(channel, *stored) for stored in history.messages]
        self.delivery: Delivery | None = (
            None
            if not self.messages
            else self.messages[0]
            if len(self.messages) == 1
            else Burst(self.messages)
        )


#: Seconds between two log lines of failed reads: an outage fails every read
#: of a reconnect storm (thousands of channels), and says so in one line a second.
FAILURES_LOGGED_EVERY = 1.0
# The line: for one failed read, for several.
_ONE_FAILED = (
    "a subscription read of {channel} (since {since}) failed: {why}; "
    "{n} subscriptions go on live without it"
)
_FAILED = (
    "{reads} subscription reads failed, the first of {channel} (since {since}): {why}; "
    "{n} subscriptions go on live without them"
)


class SharedReads:
    """`read(channel, since)`: a Deferred of the Replay, shared per turn.
    Counted: the reads sent (pushd_subscription_reads_total), the
    subscriptions answered by another's read (..._shared_total) and the reads
    that failed (..._failed_total; logged, one line at most every
    FAILURES_LOGGED_EVERY seconds, which counts the failures since the last)."""

    def __init__(self, broker: Broker, clock: Any, metrics: Any = None) -> None:
        self._broker = broker
        self._clock = clock
        self._asked: dict[tuple[str, str | None], list[Deferred[Replay]]] = {}
        self._call: Any = None
        self._metrics = metrics
        # Failures not logged yet: how many reads and subscriptions, the first's
        # channel, since and reason; when the next line may be written.
        self._failed_reads = self._failed_subscriptions = 0
        self._first_failure: tuple[str, str | None, str] = ("", None, "")
        self._log_call: Any = None
        self._next_line = 0.0

    def read(self, channel: str, since: str | None) -> Deferred[Replay]:
        """The history of `channel` after `since` (None: only its newest id,
        as `History.last`); fails as the broker's read does (BrokerUnavailable)."""
        waiting = self._asked.get((channel, since))
        if waiting is None:
            waiting = self._asked[(channel, since)] = []
            if self._call is None:
                self._call = self._clock.callLater(0, self._send)
        elif self._metrics is not None:
            self._metrics.reads_shared.inc()
        d: Deferred[Replay] = Deferred()
        waiting.append(d)
        return d

    def _send(self) -> None:
        self._call = None
        asked, self._asked = self._asked, {}
        for (channel, since), waiting in asked.items():
            d: Deferred[Replay]
            try:
                if since is None:
                    d = self._broker.last_id(channel).addCallback(_newest, channel)
                else:
                    d = self._broker.history(channel, since, None).addCallback(_after, channel)
            except Exception:
                d = fail()  # its subscribers go on live, unrecovered (pushd.session)
            if self._metrics is not None:
                self._metrics.reads_sent.inc()
            d.addBoth(self._answer, channel, since, waiting)

    def _answer(
        self,
        result: Replay | Failure,
        channel: str,
        since: str | None,
        waiting: list[Deferred[Replay]],
    ) -> None:
        if isinstance(result, Failure):
            self._failed(channel, since, result.getErrorMessage(), len(waiting))
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def _failed(self, channel: str, since: str | None, why: str, subscriptions: int) -> None:
        """Each of the read's subscriptions goes on live, `recovered` false, and
        the operator should know why: counted now, logged with the others of
        the second."""
        if self._metrics is not None:
            self._metrics.reads_failed.inc()
        if not self._failed_reads:
            self._first_failure = (channel, since, why)
        self._failed_reads += 1
        self._failed_subscriptions += subscriptions
        if self._log_call is None:
            # Bounded too when the wall clock stepped back since the last line.
            wait = min(FAILURES_LOGGED_EVERY, self._next_line - self._clock.seconds())
            self._log_call = self._clock.callLater(max(0.0, wait), self._log_failures)

    def flush(self) -> None:
        """Log the failures not logged yet now (the node stops)."""
        if self._log_call is not None:
            self._log_call.cancel()
            self._log_failures()

    def _log_failures(self) -> None:
        self._log_call = None
        self._next_line = self._clock.seconds() + FAILURES_LOGGED_EVERY
        reads, subscriptions = self._failed_reads, self._failed_subscriptions
        self._failed_reads = self._failed_subscriptions = 0
        channel, since, why = self._first_failure
        log.warn(
            _ONE_FAILED if reads == 1 else _FAILED,
            reads=reads,
            channel=channel,
            since=since,
            why=why,
            n=subscriptions,
        )


def _newest(last: str | None, channel: str) -> Replay:
    return Replay(channel, History(last=last))


def _after(history: History, channel: str) -> Replay:
    return Replay(channel, history)
