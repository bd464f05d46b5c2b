"""Defects found by a newcomer trying to break pushd from the outside (issues 13, 14).

Each test is the minimal reproduction of a defect found so, now fixed: an
integer past a double's range, the recipe's gaps (the same and lone surrogate
escapes), a publish Redis stored but never answered at SIGTERM (504, not
silence), --workers leaving requests queued while stopping, browsers' and the
backend's Idempotency-Keys meeting, and an SSE cursor too long to send back.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from tests.support import (
    SECRET,
    Node,
    PushdUnderTest,
    RawClient,
    RedisServer,
    StartPushd,
    connect_raw,
    token,
    wait_for,
    with_timeout,
)

RECIPE = Path(__file__).parent.parent / "pushd" / "broker" / "redis" / "publish_with_history.lua"

# 10**400 written as an integer: the same number as 1e400. It does not fit a double:
# a browser's JSON.parse reads it as Infinity (node -e 'JSON.parse("1"+"0".repeat(400))').
HUGE_INTEGER = "1" + "0" * 400


@pytest_twisted.ensureDeferred
async def test_an_integer_that_does_not_fit_a_double_is_refused(pushd: PushdUnderTest) -> None:
    for body in (HUGE_INTEGER, f'{{"n": -{HUGE_INTEGER}}}'):
        response = await pushd.post("bigint", body, headers={"content-type": ["application/json"]})
        answer = await response.json()
        assert (response.code, answer.get("error")) == (400, "bad_json"), answer
    response = await treq.post(
        f"{pushd.url}/publish",
        b'{"channel":"bigint","data":%s}' % HUGE_INTEGER.encode(),
        headers={"content-type": ["application/x-ndjson"]},
        persistent=False,
    )
    answer = await response.json()
    assert (response.code, answer.get("error")) == (400, "bad_json"), answer
    response = await treq.get(f"{pushd.url}/channels/bigint/history", persistent=False)
    assert (await response.json())["messages"] == []


# The largest integer pushd takes: DBL_MAX exactly (309 digits). One more is refused,
# though a double reads it as DBL_MAX: the recipe compares the digits, not a double.
DBL_MAX_INT = int(sys.float_info.max)


@pytest_twisted.ensureDeferred
async def test_the_recipe_refuses_an_integer_past_a_double(
    redis_pushd: PushdUnderTest, redis_server: RedisServer
) -> None:
    prefix = redis_pushd.cfg.redis_prefix

    async def recipe(data: str) -> bytes:
        args = (
            "-p", str(redis_server.port), "--eval", str(RECIPE),
            f"{prefix}{{bigr}}:history", ",", prefix, "bigr", data,
        )  # fmt: skip
        out, err, _code = await getProcessOutputAndValue(
            shutil.which("redis-cli") or "redis-cli", args
        )
        return out + err

    refusals = [
        "1E309",
        "1.8e308",
        "-1.8e308",
        str(2**1024),  # DBL_MAX < 2**1024: float(2**1024) raises OverflowError
        str(DBL_MAX_INT + 1),
        str(-DBL_MAX_INT - 1),
        "1" + "0" * 309,
        '"\\ud800"',  # a lone high surrogate
        '"\\udc00"',  # a lone low surrogate
        '"\\ud83d"',  # a high one at the end of the string
        '"\\ud800x"',  # a high one followed by a character
        '"\\ud800\\u0041"',  # ... by an escape that is not a low one
        '"\\ud800\\ud800"',  # ... by another high one
        '["\\ude00\\ud83d"]',  # a pair the wrong way round
    ]
    refused = [(data[:12], b"ERR pushd:" in await recipe(data)) for data in refusals]
    assert refused == [(d, True) for d, _ in refused]
    response = await treq.get(f"{redis_pushd.url}/channels/bigr/history", persistent=False)
    assert json.loads(await response.content())["messages"] == []

    # What pushd itself takes is stored, up to the boundary.
    accepted: list[tuple[str, Any]] = [
        ("1.7976931348623157e308", sys.float_info.max),
        ("-1.7976931348623157e308", -sys.float_info.max),
        (str(DBL_MAX_INT), DBL_MAX_INT),
        (str(-DBL_MAX_INT), -DBL_MAX_INT),
        ("9" * 308, int("9" * 308)),  # 308 digits: below DBL_MAX
        (str(DBL_MAX_INT - 1), DBL_MAX_INT - 1),
        ('"\\ud83d\\ude00"', "\U0001f600"),  # a surrogate pair: one character
        ('{"e": "\\uD83D\\uDE00\\u00e9"}', {"e": "\U0001f600\u00e9"}),
    ]
    for data, _ in accepted:
        out = await recipe(data)
        assert b"ERR" not in out, (data[:12], out)
    response = await treq.get(f"{redis_pushd.url}/channels/bigr/history", persistent=False)
    stored = [m["data"] for m in json.loads(await response.content())["messages"]]
    assert stored == [value for _, value in accepted]


# -- graceful stop: a publish Redis has received but not yet answered


class _HoldingProxy:
    """A TCP proxy between pushd and Redis that forwards every command but,
    once a command carrying `trigger` went through, holds every reply of Redis
    on every connection (Redis stalled, as under SIGSTOP or a partition): the
    publish is stored, its answer never comes back."""

    def __init__(self, redis_port: int, trigger: bytes) -> None:
        self.redis_port = redis_port
        self.trigger = trigger
        self.stored: Deferred[None] = Deferred()
        self.holding = False

    def factory(self) -> Factory:
        proxy = self

        class ToRedis(Protocol):
            def __init__(self, peer: Protocol) -> None:
                self.peer = peer
                self.triggered = False
                self.pending: list[bytes] = []

            def connectionMade(self) -> None:
                for chunk in self.pending:
                    self.transport.write(chunk)  # type: ignore[union-attr]
                self.pending = []

            def dataReceived(self, data: bytes) -> None:
                if proxy.holding:
                    if self.triggered and not proxy.stored.called:
                        proxy.stored.callback(None)  # Redis answered: it ran the script
                    return
                self.peer.transport.write(data)  # type: ignore[union-attr]

            def connectionLost(self, reason: Any = None) -> None:
                self.peer.transport.loseConnection()  # type: ignore[union-attr]

        class FromPushd(Protocol):
            def connectionMade(self) -> None:
                self.upstream = ToRedis(self)
                endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.redis_port)
                connectProtocol(endpoint, self.upstream)

            def dataReceived(self, data: bytes) -> None:
                if proxy.trigger in data:
                    self.upstream.triggered = proxy.holding = True
                if self.upstream.transport is None:
                    self.upstream.pending.append(data)
                else:
                    self.upstream.transport.write(data)

            def connectionLost(self, reason: Any = None) -> None:
                if self.upstream.transport is not None:
                    self.upstream.transport.loseConnection()

        return Factory.forProtocol(FromPushd)


#: Stops tried: before the fix the answer was lost in about half of them.
STOPS = 5


@pytest_twisted.ensureDeferred
async def test_sigterm_answers_a_publish_redis_has_not_answered(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    for attempt in range(STOPS):
        answer = await _stop_with_a_publish_in_redis(tmp_path / str(attempt), own_redis)
        status_line = answer.split(b"\r\n", 1)[0]
        assert status_line in (b"HTTP/1.1 200 OK", b"HTTP/1.1 504 Gateway Timeout"), (
            attempt,
            answer,
        )


async def _stop_with_a_publish_in_redis(directory: Path, redis: RedisServer) -> bytes:
    """What a producer reads when pushd is SIGTERMed while Redis holds its publish."""
    directory.mkdir()
    proxy = _HoldingProxy(redis.port, b"newcomer-stuck")
    listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(proxy.factory())
    node = Node(
        directory,
        "--redis", f"redis://127.0.0.1:{listening.getHost().port}",
        "--redis-timeout", "30",
        "--shutdown-timeout", "0.5",
    )  # fmt: skip
    node.start()
    try:
        await node.ready()
        await node.publish("stuck", "warm-up: the publish script is loaded")
        client = await connect_raw(node.port)
        body = b"newcomer-stuck"
        assert client.transport is not None
        client.transport.write(
            b"POST /channels/stuck HTTP/1.1\r\nHost: pushd\r\n"
            b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await with_timeout(proxy.stored)  # Redis ran the publish; its answer is held
        assert node.process is not None
        node.process.send_signal(signal.SIGTERM)
        await with_timeout(client.lost, 15)
        await wait_for(lambda: node.process is None or node.process.poll() is not None, 15)
        node.process = None
    finally:
        node.stop()
        await listening.stopListening()
    return client.data


@pytest_twisted.ensureDeferred
async def test_workers_leave_no_request_unanswered_while_stopping(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    proxy = _HoldingProxy(own_redis.port, b"newcomer-stuck")
    listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(proxy.factory())
    node = Node(
        tmp_path,
        "--workers", "2",
        "--redis", f"redis://127.0.0.1:{listening.getHost().port}",
        "--redis-timeout", "30",
        "--shutdown-timeout", "3",
    )  # fmt: skip
    node.start()
    unanswered: list[bytes] = []
    try:
        await node.ready()
        # A stop during a worker's start-up is not what this test is about.
        await node.workers_ready()
        await node.publish("stuck", "warm-up: the publish script is loaded")
        stuck = await connect_raw(node.port)  # keeps the stop busy for --shutdown-timeout
        assert stuck.transport is not None
        stuck.transport.write(
            b"POST /channels/stuck HTTP/1.1\r\nHost: pushd\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 14\r\n\r\nnewcomer-stuck"
        )
        await with_timeout(proxy.stored)
        assert node.process is not None
        node.process.send_signal(signal.SIGTERM)
        # Clients keep coming while pushd stops: each is refused or answered.
        while node.process.poll() is None:
            try:
                late = await connect_raw(node.port)
            except ConnectError:
                break  # refused: the producer goes elsewhere at once
            assert late.transport is not None
            late.transport.write(b"GET / HTTP/1.1\r\nHost: pushd\r\n\r\n")  # no broker needed
            await with_timeout(late.lost, 15)
            if not late.data.startswith(b"HTTP/1.1 "):
                unanswered.append(late.data)
                break
            await deferLater(reactor, 0.05, lambda: None)  # the next producer, a moment later
        await wait_for(lambda: node.process is None or node.process.poll() is not None, 15)
        node.process = None
    finally:
        node.stop()
        await listening.stopListening()
    assert unanswered == []


# -- idempotency keys are shared between the backend and browsers


@pytest_twisted.ensureDeferred
async def test_a_browser_cannot_take_the_backends_idempotency_key(
    start_pushd: StartPushd,
) -> None:
    pushd = await start_pushd(token_secret=SECRET, api_key=("backend-key",))
    browser = token("mallory", publish=["ev.*"])
    response = await pushd.post(
        "ev.orders",
        "junk",
        headers={"authorization": [f"Bearer {browser}"], "idempotency-key": ["order-43"]},
    )
    assert response.code == 200, await response.text()
    response = await pushd.post(
        "ev.orders",
        json.dumps({"order": 43, "status": "paid"}),
        headers={
            "authorization": ["Bearer backend-key"],
            "content-type": ["application/json"],
            "idempotency-key": ["order-43"],
        },
    )
    answer = await response.json()
    assert response.code == 200, answer
    # The browser's own retry is still idempotent, in its own space.
    first = None
    for _ in range(2):
        response = await pushd.post(
            "ev.orders",
            "again",
            headers={"authorization": [f"Bearer {browser}"], "idempotency-key": ["order-44"]},
        )
        assert response.code == 200, await response.text()
        got = (await response.json())["id"]
        assert first in (None, got)
        first = got


# -- SSE: the cursor of a subscription within every limit cannot be sent back


@pytest_twisted.ensureDeferred
async def test_an_sse_cursor_can_be_sent_back(pushd: PushdUnderTest) -> None:
    names = [f"c{i:03d}" + "x" * 96 for i in range(100)]
    query = "&".join(f"channel={name}" for name in names).encode()

    async def open_stream(last_event_id: bytes | None) -> RawClient:
        client = await connect_raw(pushd.port)
        assert client.transport is not None
        client.transport.write(
            b"GET /sse?%s HTTP/1.1\r\nHost: pushd\r\nAccept: text/event-stream\r\n%s\r\n"
            % (query, b"Last-Event-ID: %s\r\n" % last_event_id if last_event_id else b"")
        )
        return client

    first = await open_stream(None)
    received = await first.until(b'"channels":')
    assert first.transport is not None
    first.transport.loseConnection()
    cursor = re.findall(rb"^id: (\S+)", received, re.M)[-1]
    again = await open_stream(cursor)
    received = await again.until(b"\r\n\r\n")
    assert again.transport is not None
    again.transport.loseConnection()
    assert received.startswith(b"HTTP/1.1 200 "), (len(query), len(cursor), received[:120])
