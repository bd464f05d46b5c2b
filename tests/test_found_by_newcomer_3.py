"""Defects found by a third newcomer trying to break the publish connection
(pushd/broker/redis/connection.py) from the outside, with real processes.

Each test is the minimal reproduction of a defect, now fixed.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import hiredis
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.portforward import ProxyClientFactory, ProxyServer

from tests.support import Node, RedisServer, wait_for


def redis_command(server: RedisServer, *args: str) -> Any:
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        reader = hiredis.Reader()
        s.sendall(hiredis.pack_command(args))
        while (reply := reader.gets()) is False:
            reader.feed(s.recv(65536))
        return reply


class Gate(ProxyServer):
    """While the factory holds, a connection is accepted and then never
    answered (a Redis frozen, a host gone behind a dead link); afterwards new
    connections go through to the real Redis."""

    def connectionMade(self) -> None:
        factory: GateFactory = self.factory
        if factory.hold:
            factory.held.append(self)
            return
        client = ProxyClientFactory()
        client.server = self
        client.protocol.noisy = False
        self.transport.pauseProducing()
        reactor.connectTCP("127.0.0.1", factory.redis_port, client)

    def dataReceived(self, data: bytes) -> None:
        factory: GateFactory = self.factory
        if self in factory.held:
            factory.swallowed += data
            return
        super().dataReceived(data)


class GateFactory(Factory):
    protocol = Gate
    noisy = False

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.hold = True
        self.held: list[Gate] = []
        self.swallowed = b""


async def post(node: Node, channel: str) -> tuple[int, bytes]:
    response = await treq.post(
        f"{node.url}/channels/{channel}",
        b'"hi"',
        headers={"content-type": ["application/json"]},
        persistent=False,
    )
    return response.code, await response.content()


@pytest_twisted.ensureDeferred
async def test_a_handshake_never_answered_is_cut_and_retried(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    gate = GateFactory(own_redis.port)
    port = reactor.listenTCP(0, gate, interface="127.0.0.1")
    node = Node(
        tmp_path,
        "--redis",
        f"redis://127.0.0.1:{port.getHost().port}",
        "--redis-timeout",
        "0.5",
    )
    try:
        node.start()
        # The publish connection's handshake went into a connection nobody answers.
        await wait_for(lambda: b"pushd-publish" in gate.swallowed, what="the publish handshake")
        gate.hold = False
        await node.ready()  # the pool found the real Redis through the gate

        async def published() -> bool:
            code, _ = await post(node, "gate")
            return code == 200

        # Within a few --redis-timeouts (plus the 2 s reconnect backoff at most).
        await wait_for(published, timeout=10, what="a publish to be stored")
    finally:
        node.stop()
        await port.stopListening()
        for held in gate.held:
            held.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_is_said_clearly_without_critical_tracebacks(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    redis_command(own_redis, "CONFIG", "SET", "requirepass", "right")
    node = Node(tmp_path, "--redis", f"redis://:wrong@127.0.0.1:{own_redis.port}")
    try:
        node.start()

        def refused_auths() -> int:
            """AUTH refused by Redis so far (ACL LOG groups alike entries, with a count)."""
            with socket.create_connection(("127.0.0.1", own_redis.port)) as s:
                s.sendall(hiredis.pack_command(("AUTH", "right")))
                s.sendall(hiredis.pack_command(("ACL", "LOG")))
                reader, replies = hiredis.Reader(), []
                while len(replies) < 2:
                    reader.feed(s.recv(65536))
                    while (reply := reader.gets()) is not False:
                        replies.append(reply)
            entries = replies[1]
            return sum(dict(zip(e[::2], e[1::2], strict=True))[b"count"] for e in entries)

        # Each of the 12 connections (publish, 10 in the pool, subscriber) is
        # refused once, then again: retried, and said once.
        await wait_for(lambda: refused_auths() > 24, what="refused handshakes, retried")
        said = "set-up failed: Redis refused AUTH: WRONGPASS invalid username-password pair"
        for kind in ("publish connection", "command pool", "subscriber connection"):
            lines = [line for line in node.output().splitlines() if said in line]
            assert len([line for line in lines if f"({kind})" in line]) == 1, node.output()
        code, body = await post(node, "pw")
        assert code == 503, body
        assert "NoTransition" not in node.output()
        assert "#critical" not in node.output()
        assert "Redis error: could not auth" not in node.output()
    finally:
        node.stop()
        redis_command(own_redis, "CONFIG", "SET", "requirepass", "")


class Yes(Protocol):
    """Not Redis: +OK to every command (a proxy or look-alike that answers
    what Redis would not)."""

    def dataReceived(self, data: bytes) -> None:
        reader = self.factory.readers.setdefault(self, hiredis.Reader())
        reader.feed(data)
        while reader.gets() is not False:
            self.transport.write(b"+OK\r\n")


@pytest_twisted.ensureDeferred
async def test_a_reply_of_the_wrong_shape_is_not_a_500(tmp_path: Path) -> None:
    factory = Factory.forProtocol(Yes)
    factory.readers = {}
    factory.noisy = False
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    node = Node(tmp_path, "--redis", f"redis://127.0.0.1:{port.getHost().port}")
    try:
        node.start()
        await wait_for(
            lambda: "connected (publish connection)" in node.output(), what="the handshake"
        )

        async def answered() -> bool:
            try:
                answer[:] = [await post(node, "yes")]
            except Exception:
                return False
            return True

        answer: list[tuple[int, bytes]] = []
        await wait_for(answered, what="an answer")
        code, body = answer[0]
        assert code in (503, 504), body
    finally:
        node.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_push_whose_history_key_is_not_a_stream_wrote_nothing(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """push.lua takes back its two LPUSHes when publish.lua refuses the
    history key (WRONGTYPE): 503 and both lists as they were."""
    redis_command(own_redis, "SET", "pushd:{ph}:history", "not a stream")
    redis_command(own_redis, "LPUSH", "message_gateway_event", "earlier")
    node = Node(tmp_path, "--redis", f"redis://127.0.0.1:{own_redis.port}")
    try:
        node.start()
        await node.ready()
        response = await treq.post(f"{node.url}/push?c=ph", b"hello", persistent=False)
        body = await response.content()
        assert response.code == 503, body
        assert redis_command(own_redis, "LRANGE", "ph", "0", "-1") == []
        assert redis_command(own_redis, "LRANGE", "message_gateway_event", "0", "-1") == [
            b"earlier"
        ]
        assert redis_command(own_redis, "GET", "pushd:{ph}:history") == b"not a stream"
    finally:
        node.stop()


@pytest_twisted.ensureDeferred
async def test_a_push_answered_503_wrote_nothing(own_redis: RedisServer, tmp_path: Path) -> None:
    redis_command(own_redis, "SET", "message_gateway_event", "not a list")
    node = Node(tmp_path, "--redis", f"redis://127.0.0.1:{own_redis.port}")
    try:
        node.start()
        await node.ready()
        response = await treq.post(f"{node.url}/push?c=pl", b"hello", persistent=False)
        body = await response.content()
        assert response.code == 503, body  # refused: the event list is not a list
        assert redis_command(own_redis, "LRANGE", "pl", "0", "-1") == []
    finally:
        node.stop()
