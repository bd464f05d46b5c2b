"""SIGTERM while producers publish at full speed over kept-alive connections,
on `twistd -n pushd --redis ...`: every answer is checked against what Redis
holds. A 200's id is in history with its data, a 503 `shutting_down`'s message
is not, every message in history was answered 200, no request is left without
an answer, and each connection's last answer says `Connection: close`.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater

from tests.support import (
    Node,
    PushdUnderTest,
    RedisServer,
    connect_raw,
    redis_options,
    wait_for,
    with_timeout,
)

RUNS = 20


class Publisher(Protocol):
    """Publishes `{"p":<publisher>,"n":<n>}` to `gs-<publisher>`, one request
    after the answer to the previous one, as fast as the answers come (at most
    `limit` requests, when given)."""

    def __init__(self, number: int, limit: int | None = None) -> None:
        self.number = number
        self.limit = limit
        self.sent = 0
        #: (n, status, headers, body) of each answer, in order.
        self.answers: list[tuple[int, int, dict[str, str], bytes]] = []
        self.lost: Deferred[None] = Deferred()
        self._buffer = b""

    def connectionMade(self) -> None:
        self._send()

    def _send(self) -> None:
        body = json.dumps({"p": self.number, "n": self.sent}).encode()
        assert self.transport is not None
        self.transport.write(
            b"POST /channels/gs-%d HTTP/1.1\r\nHost: pushd\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (self.number, len(body), body)
        )
        self.sent += 1

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while True:
            head, sep, rest = self._buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers["content-length"])
            if len(rest) < length:
                return
            self._buffer = rest[length:]
            n = len(self.answers)
            self.answers.append((n, int(status_line.split(" ")[1]), headers, rest[:length]))
            if headers.get("connection") == "close":
                return  # the last answer: pushd closes
            if len(self.answers) == self.sent and self.sent != self.limit:
                self._send()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


async def history(redis: Any, prefix: str, channel: str) -> dict[str, Any]:
    """What Redis holds of a channel: id -> data."""
    entries = await redis.execute_command("XRANGE", f"{prefix}{{{channel}}}:history", "-", "+")
    held = {}
    for msg_id, fields in entries:
        values = dict(zip(fields[::2], fields[1::2], strict=True))
        held[msg_id] = json.loads(values["d"])
    return held


@pytest.mark.parametrize("run", range(RUNS))
@pytest.mark.parametrize("publishers", [1, 4])
@pytest_twisted.ensureDeferred
async def test_sigterm_while_publishing(
    tmp_path: Path, redis_server: RedisServer, redis_client: Any, publishers: int, run: int
) -> None:
    prefix = f"gs{time.monotonic_ns()}:"
    options = ("--shutdown-timeout", "5", "--history-size", "1000000")
    node = Node(tmp_path, *redis_options([redis_server], prefix, *options))
    node.start()
    try:
        await node.ready()
        clients = []
        for number in range(publishers):
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", node.port)
            clients.append(await with_timeout(connectProtocol(endpoint, Publisher(number))))
        # Mid-stream: every publisher has had answers, then a moment more.
        await wait_for(lambda: all(len(c.answers) >= 20 for c in clients), what="answers")
        await deferLater(reactor, random.uniform(0, 0.05), lambda: None)
        assert node.process is not None
        node.process.send_signal(signal.SIGTERM)
        signalled = [len(c.answers) for c in clients]
        for client in clients:
            await with_timeout(client.lost, 15)
        await wait_for(lambda: node.process is None or node.process.poll() is not None, 15)
        status = node.process.poll()
        node.process = None
    finally:
        node.stop()
    output = node.output()
    assert status in (0, -signal.SIGTERM), (status, output)
    assert "Traceback" not in output, output

    for client, at_signal in zip(clients, signalled, strict=True):
        held = await history(redis_client, prefix, f"gs-{client.number}")
        stored = {data["n"]: msg_id for msg_id, data in held.items()}
        assert client.sent == len(client.answers), "a request was left without an answer"
        assert len(client.answers) >= at_signal
        *_, last = client.answers
        assert last[2].get("connection") == "close", last
        for n, code, headers, body in client.answers:
            if code == 200:
                msg_id = json.loads(body)["id"]
                assert stored.get(n) == msg_id, (n, msg_id, "a 200 for a message not stored")
            else:
                assert code == 503, (n, code, body)
                assert json.loads(body)["error"] == "shutting_down"
                assert headers["connection"] == "close"
                assert n not in stored, (n, "a 503 for a message that was stored")
        answered_200 = {n for n, code, _, _ in client.answers if code == 200}
        assert set(stored) == answered_200, "a stored message without its 200"
        # Answers given after the signal: the stop took effect at once.
        assert len(client.answers) - at_signal < 50, len(client.answers) - at_signal


@pytest_twisted.ensureDeferred
async def test_idle_kept_alive_connections_at_sigterm(tmp_path: Path) -> None:
    """An idle connection may still send a request during the grace second: it
    gets 503 shutting_down; one that sends nothing is closed without a word."""
    node = Node(tmp_path)
    node.start()
    try:
        await node.ready()
        asking, silent = Publisher(0, limit=1), Publisher(1, limit=1)
        for client in (asking, silent):
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", node.port)
            await with_timeout(connectProtocol(endpoint, client))
        await wait_for(lambda: asking.answers and silent.answers, what="the first answers")
        assert node.process is not None
        started = time.monotonic()
        node.process.send_signal(signal.SIGTERM)
        await deferLater(reactor, 0.3, lambda: None)
        asking._send()
        await with_timeout(asking.lost, 5)
        await with_timeout(silent.lost, 5)
        assert time.monotonic() - started < 3
        await wait_for(lambda: node.process is None or node.process.poll() is not None, 10)
        node.process = None
    finally:
        node.stop()
    _, code, headers, body = asking.answers[-1]
    assert code == 503 and json.loads(body)["error"] == "shutting_down"
    assert headers["connection"] == "close"
    assert [a[1] for a in silent.answers] == [200] and silent._buffer == b""


@pytest_twisted.ensureDeferred
async def test_a_stop_drops_a_stream_that_reads_nothing() -> None:
    """A stream whose reader stopped reading cannot take its last bytes: past the
    shutdown timeout and the answers' grace, the stop drops it (a stopped
    service holds no connection), and does not wait longer than that."""
    pushd = PushdUnderTest.config(shutdown_timeout=0.2, max_send_buffer=1 << 30)
    await pushd.start()
    assert pushd.service is not None
    site: Any = pushd.service.site
    reader = await connect_raw(pushd.port)
    assert reader.transport is not None
    reader.transport.write(b"GET /sse?channel=big HTTP/1.1\r\nHost: pushd\r\n\r\n")
    await reader.until(b"subscribed")
    reader.transport.pauseProducing()  # reads no more: the kernel's buffers fill up
    chunk = json.dumps("x" * 60_000).encode()
    for _ in range(400):  # 24 MB: more than loopback's buffers hold
        await pushd.service.broker.publish("big", chunk)
    # The stream holds its connection (twisted.web's channel is let go).
    assert len(site.streams[0].connections()) == 1 and not site.channels
    started = time.monotonic()
    await pushd.stop()
    assert site.channels == set() and not site.streams[0].connections()
    elapsed = time.monotonic() - started
    grace = pushd.service.answer_grace
    assert 0.2 + grace <= elapsed < 0.2 + 2 * grace + 1, elapsed
    reader.transport.resumeProducing()
    await with_timeout(reader.lost)
