"""Attacks on commit 055b4ae (pushd.polling's direct dispatch, the lock-free
publish metrics of pushd.metrics, the head deadline a hot-path request no
longer starts in pushd.web.channel).

Defects (these tests failed on 055b4ae; fixed since):

- pushd.polling._do_poll catches `Exception` only, where Twisted's doPoll
  (through log.callWithLogger) catches every BaseException but
  KeyboardInterrupt: a BaseException that is not an Exception (GeneratorExit,
  SystemExit, a library's own) out of a socket's handling, e.g. its protocol's
  connectionLost, escapes doIteration: it is not logged as the socket's
  failure, and the other sockets of the same poll batch are not served in
  that iteration.
- pushd_messages_published, pushd_deliveries and pushd_publish_seconds lost
  their `_created` samples, which prometheus_client's Counter and Histogram
  expose (and pushd's other counters still do).
- (older than 055b4ae) after a hot-path request twisted.web's "eat one blank
  line before a request line" state is not reset: a client ending each
  request with an extra CRLF gets a 400 on the second hot-path request.

Attacks that held (these pass): sockets removed or replaced by an earlier
event of the same batch; the exposition of label values that need escaping;
a batch's counts and the admin stats' reading of them; slowloris clients
around a hot-path request (a partial head in the same read or later, while
the broker is slow or down, one byte at a time after the answer, a blank
line after a request).
"""

from __future__ import annotations

import select
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import fail
from twisted.internet.epollreactor import EPollReactor
from twisted.logger import LogEvent, globalLogPublisher

from pushd import polling
from pushd.broker import BrokerUnavailable, OutcomeUnknown
from pushd.metrics import PUBLISH_BUCKETS, Metrics, ReactorCounter
from tests.test_unit_harness import Node, post
from tests.test_unit_http import _held

# -- pushd.polling


class _Poller:
    """A poller that answers one batch of events."""

    def __init__(self, events: list[tuple[int, int]]) -> None:
        self.events = events

    def poll(self, timeout: float, most: int) -> list[tuple[int, int]]:
        events, self.events = self.events, []
        return events


class _Selectable:
    def __init__(self, name: str) -> None:
        self.name = name

    def logPrefix(self) -> str:
        return self.name


class _Odd(BaseException):
    """A BaseException that is not an Exception (as GeneratorExit, SystemExit)."""


def _batch_reactor(
    direct: bool, handled: list[str], raising: dict[str, BaseException]
) -> tuple[EPollReactor, Any]:
    """An epoll reactor whose next poll gives fds 10 and 11 ready: `handled`
    gets each name served; a name in `raising` raises that."""
    reactor = EPollReactor()
    real = reactor._poller
    reactor._poller = _Poller([(10, select.EPOLLIN), (11, select.EPOLLIN)])
    reactor._selectables = {10: _Selectable("first"), 11: _Selectable("second")}

    def handle(selectable: _Selectable, fd: int, event: int) -> None:
        handled.append(selectable.name)
        if selectable.name in raising:
            raise raising[selectable.name]

    target: Any = reactor
    target._doReadOrWrite = handle
    if direct:
        assert polling.dispatch_directly(reactor)
    return reactor, real


def _iterate(direct: bool, raising: dict[str, BaseException]) -> list[str]:
    handled: list[str] = []
    reactor, real = _batch_reactor(direct, handled, raising)
    _poll_once(reactor, real, direct)
    return handled


def _poll_once(reactor: Any, real: Any, direct: bool) -> None:
    """One poll of `reactor`, pushd's (`direct`) or Twisted's; `real` closed after."""
    try:
        if direct:
            reactor.doIteration(0)
        else:
            EPollReactor.doPoll(reactor, 0)
    finally:
        real.close()


@pytest.mark.parametrize(
    "error",
    [_Odd("odd"), GeneratorExit(), SystemExit(3)],
    ids=["own-BaseException", "GeneratorExit", "SystemExit"],
)
def test_a_base_exception_out_of_one_socket_is_logged_and_the_batch_goes_on(
    error: BaseException,
) -> None:
    """Was a defect: Twisted's doPoll (callWithLogger) logs any BaseException but
    KeyboardInterrupt and serves the rest of the batch; pushd's escapes."""
    failures: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        # A legacy log.err's event has "failure", a twisted.logger one "log_failure".
        if event.get("log_failure", event.get("failure")) is not None:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        # What Twisted's own loop does, which pushd's copies.
        assert _iterate(False, {"first": error}) == ["first", "second"]
        assert len(failures) == 1
        failures.clear()
        try:
            handled = _iterate(True, {"first": error})
        except BaseException as escaped:
            pytest.fail(f"{escaped!r} escaped the poll: the batch's other sockets wait")
        assert handled == ["first", "second"]
        assert len(failures) == 1
    finally:
        globalLogPublisher.removeObserver(observe)


def test_an_exception_out_of_one_socket_is_logged_and_the_batch_goes_on() -> None:
    assert _iterate(True, {"first": RuntimeError("boom")}) == ["first", "second"]


def test_a_socket_removed_by_an_earlier_event_of_the_batch_is_skipped() -> None:
    handled: list[str] = []
    reactor, real = _batch_reactor(True, handled, {})
    inner = reactor._doReadOrWrite

    def handle(selectable: _Selectable, fd: int, event: int) -> None:
        inner(selectable, fd, event)
        reactor._selectables.pop(11, None)

    target: Any = reactor
    target._doReadOrWrite = handle
    try:
        reactor.doIteration(0)
    finally:
        real.close()
    assert handled == ["first"]


def test_an_fd_reused_within_the_batch_is_served_to_its_new_socket_as_twisted_does() -> None:
    def run(direct: bool) -> list[str]:
        handled: list[str] = []
        reactor, real = _batch_reactor(direct, handled, {})
        inner = reactor._doReadOrWrite

        def handle(selectable: _Selectable, fd: int, event: int) -> None:
            inner(selectable, fd, event)
            if fd == 10:
                reactor._selectables[11] = _Selectable("reused")

        target: Any = reactor
        target._doReadOrWrite = handle
        _poll_once(reactor, real, direct)
        return handled

    assert run(True) == run(False) == ["first", "reused"]


# -- pushd.metrics


def _sample_names(registry: Any, family: str) -> set[str]:
    text = generate_latest(registry).decode()
    return {
        s.name
        for f in text_string_to_metric_families(text)
        if f.name.startswith(family)
        for s in f.samples
    }


def test_the_publish_metrics_keep_their_created_samples() -> None:
    """Was a defect: prometheus_client's Counter and Histogram (and every other
    pushd counter) expose `<name>_created`; the Reactor ones dropped it."""
    theirs = CollectorRegistry()
    Counter("pushd_messages_published", "x", ["api"], registry=theirs).labels("push").inc()
    Counter("pushd_deliveries", "x", registry=theirs).inc()
    Histogram("pushd_publish_seconds", "x", buckets=PUBLISH_BUCKETS, registry=theirs).observe(1)
    metrics = Metrics()
    metrics.published.labels("push").inc()
    metrics.deliveries.inc()
    metrics.publish_seconds.observe(1)
    for family in ("pushd_messages_published", "pushd_deliveries", "pushd_publish_seconds"):
        expected = _sample_names(theirs, family)
        assert f"{family}_created" in expected
        assert _sample_names(metrics.registry, family) == expected, family


def test_label_values_needing_escapes_expose_and_parse_back() -> None:
    registry = CollectorRegistry()
    counter = ReactorCounter("x_things", "Things", "api")
    registry.register(counter)
    odd = 'a"b\\c\nd{e}=f,g'
    counter.labels(odd).inc(2)
    counter.labels("").inc()
    text = generate_latest(registry).decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "x_things"]
    got = {s.labels["api"]: s.value for s in family.samples if s.name == "x_things_total"}
    assert got == {odd: 2.0, "": 1.0}


def test_a_batch_counts_each_message_once_and_the_admin_stats_read_it() -> None:
    from pushd.admin.stats import _sum_samples

    node = Node()
    conn = node.connect()
    conn.send(post("/channels/a", b"0"))
    body = b'{"channel": "a", "data": "1"}\n{"channels": ["b", "c"], "data": "2"}\n'
    conn.send(post("/publish", body, {"Content-Type": "application/x-ndjson"}))
    assert [r.status for r in conn.responses()] == [200, 200]
    metrics = node.service.metrics
    assert _sum_samples(metrics.published, "_total") == {"channels": 1, "push": 0, "publish": 3}
    text = generate_latest(metrics.registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    count = [s for s in families["pushd_publish_seconds"].samples if s.name.endswith("_count")]
    assert [s.value for s in count] == [2]


# -- the head deadline around hot-path requests


def _closed_within(node: Node, conn: Any, seconds: int, trickle: bytes = b"") -> bool:
    for _ in range(seconds):
        if trickle:
            conn.send(trickle)
        node.advance(1)
        if conn.transport.write_closed:
            return True
    return False


def test_a_head_trickled_behind_a_hot_request_waiting_for_a_slow_broker_gets_408() -> None:
    node = Node(handshake_timeout=5)
    held = _held(node)
    conn = node.connect()
    conn.send(post("/channels/a", b"0"))
    held.pop().callback(None)
    conn.send(post("/channels/a", b"1") + b"P")
    assert not _closed_within(node, conn, 30, b"O")  # the broker's wait
    held.pop().callback(None)
    assert _closed_within(node, conn, 6, b"S")
    assert [r.status for r in conn.responses()] == [200, 200, 408]


@pytest.mark.parametrize("error", [BrokerUnavailable("down"), OutcomeUnknown("late")])
@pytest.mark.parametrize("same_read", [True, False], ids=["same-read", "later-read"])
def test_a_head_begun_after_a_failed_hot_publish_gets_408(
    error: Exception, same_read: bool
) -> None:
    node = Node(handshake_timeout=5)
    conn = node.connect()
    conn.send(post("/channels/a", b"0"))
    node.advance(20)
    node.broker.publish = lambda *a, **k: fail(error)
    request = post("/channels/a", b"1")
    conn.send(*([request + b"P"] if same_read else [request, b"P"]))
    assert _closed_within(node, conn, 6, b"O")
    statuses = [r.status for r in conn.responses()]
    assert statuses[0] == 200 and statuses[-1] == 408 and statuses[1] in (503, 504)


def test_blank_lines_after_a_hot_answer_start_the_deadline() -> None:
    node = Node(handshake_timeout=5)
    conn = node.connect()
    conn.send(post("/channels/a", b"0"))
    node.advance(10)
    conn.send(b"\r\n")
    assert _closed_within(node, conn, 6)
    assert [r.status for r in conn.responses()] == [200, 408]


def test_a_blank_line_after_each_request_is_eaten_on_both_paths() -> None:
    """Was a defect (older than 055b4ae): twisted.web eats one blank line before
    each request line (resetting its state after each request); after a
    hot-path request it is not reset, so the second blank line is a 400."""
    for host in ("10.1.2.3", "127.0.0.1"):  # twisted.web (403: no key), hot path
        node = Node()
        conn = node.connect(host)
        for _ in range(3):
            conn.send(post("/channels/a", b"0") + b"\r\n")
        statuses = [r.status for r in conn.responses()]
        assert len(statuses) == 3 and 400 not in statuses, (host, statuses)
