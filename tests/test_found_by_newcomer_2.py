"""Defects found by a second newcomer trying to break shards (issue 16) from the outside.

Each test is the minimal reproduction of a defect, now fixed.
"""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from tests.support import (
    PushdUnderTest,
    RedisServer,
    channels_by_shard,
    connect_raw,
    wait_for,
    with_timeout,
)


async def health(pushd: PushdUnderTest) -> dict[str, Any]:
    response = await treq.get(f"{pushd.url}/health", persistent=False)
    answer: dict[str, Any] = await response.json()
    return answer


@pytest_twisted.ensureDeferred
async def test_a_shard_frozen_past_the_timeout_comes_back(
    redis_server: RedisServer, own_redis: RedisServer, prefix: str
) -> None:
    pushd = PushdUnderTest.config(
        redis=(redis_server.address(), own_redis.address()),
        redis_prefix=prefix,
        redis_timeout=1,
        redis_pool_size=1,
    )
    await pushd.start()
    handshake_failed: list[str] = []

    def observe(event: Any) -> None:
        text = " ".join(str(m) for m in event.get("message", ()))
        if "could not" in text or "could not" in str(event.get("log_format", "")):
            handshake_failed.append(text)

    globalLogPublisher.addObserver(observe)
    assert own_redis.process is not None
    (_, (frozen_channel,)) = channels_by_shard("frozen", 2)
    try:
        await pushd.publish(frozen_channel, {"n": 1})
        own_redis.process.send_signal(signal.SIGSTOP)
        # A read on the frozen shard: its pool connection times out and reconnects
        # into the frozen Redis (the kernel accepts the connection, nobody answers).
        response = await treq.get(
            f"{pushd.url}/channels/{frozen_channel}/history", persistent=False
        )
        assert response.code == 503
        await wait_for(lambda: handshake_failed, timeout=20, what="a pool handshake timed out")
        own_redis.process.send_signal(signal.SIGCONT)

        async def back() -> bool:
            return (await health(pushd))["status"] == "ok"

        await wait_for(back, timeout=10, what="the thawed shard back in /health")
        response = await treq.get(
            f"{pushd.url}/channels/{frozen_channel}/history", persistent=False
        )
        assert response.code == 200, await response.text()
    finally:
        globalLogPublisher.removeObserver(observe)
        own_redis.process.send_signal(signal.SIGCONT)
        await pushd.stop()


def unread_bytes_at(port: int) -> int:
    """Bytes the kernel holds unread for the server side of TCP `port` (a
    stopped redis-server does not read: a command sent to it stays there)."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01":  # ESTABLISHED, server side
                total += int(fields[4].split(":")[1], 16)
    return total


@pytest_twisted.ensureDeferred
async def test_a_read_in_flight_at_stop_gets_an_answer(
    redis_server: RedisServer, own_redis: RedisServer, prefix: str
) -> None:
    pushd = PushdUnderTest.config(
        redis=(redis_server.address(), own_redis.address()),
        redis_prefix=prefix,
        redis_timeout=30,
        shutdown_timeout=1,
    )
    await pushd.start()
    assert own_redis.process is not None
    (_, (frozen_channel,)) = channels_by_shard("frozen-read", 2)
    raw = await connect_raw(pushd.port)
    try:
        await pushd.publish(frozen_channel, {"n": 1})
        own_redis.process.send_signal(signal.SIGSTOP)
        before = unread_bytes_at(own_redis.port)
        raw.transport.write(  # type: ignore[union-attr]
            b"GET /channels/%s/history HTTP/1.1\r\nHost: x\r\n\r\n" % frozen_channel.encode()
        )
        await wait_for(
            lambda: unread_bytes_at(own_redis.port) > before, what="the read sent to Redis"
        )
        await pushd.stop()
        await with_timeout(raw.lost, 10)
        assert raw.data.startswith(b"HTTP/1.1 5"), raw.data
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
        await pushd.stop()


def test_two_dbs_of_one_redis_are_refused(redis_server: RedisServer) -> None:
    """Redis pub/sub ignores the db: two shards on one server would hear every
    message and node command twice. The options and the broker refuse them."""
    from pushd.broker.redis.address import ShardAddress
    from pushd.broker.redis.broker import RedisBroker
    from pushd.config import ConfigError, load

    url = f"redis://127.0.0.1:{redis_server.port}"
    with pytest.raises(ConfigError, match="one Redis server"):
        load({"redis": [f"{url}/0", f"{url}/1"]}, environ={})
    one = redis_server.address()
    with pytest.raises(ValueError, match="one Redis server"):
        RedisBroker(reactor, [ShardAddress(one), ShardAddress(dataclasses.replace(one, db=1))])


@pytest_twisted.ensureDeferred
async def test_two_names_of_one_redis_are_told(redis_server: RedisServer, prefix: str) -> None:
    """`localhost` and `127.0.0.1`: found once connected (the shards' run ids)."""
    from twisted.logger import globalLogPublisher

    said: list[str] = []

    def observe(event: dict) -> None:
        if "one Redis server" in str(event.get("log_format", "")):
            said.append(event["a"] + " " + event["b"])

    one = redis_server.address()
    alias = dataclasses.replace(one, host="localhost")
    pushd = PushdUnderTest.config(redis=(one, alias), redis_prefix=prefix, node_ttl=1)
    globalLogPublisher.addObserver(observe)
    try:
        await pushd.start()
        await wait_for(lambda: said, what="the node to say the shards are one server")
        assert said == [f"127.0.0.1:{one.port} localhost:{one.port}"]
    finally:
        globalLogPublisher.removeObserver(observe)
        await pushd.stop()


@pytest_twisted.ensureDeferred
async def test_a_frozen_key_shard_answers_503_not_an_unbound_200(
    redis_server: RedisServer, own_redis: RedisServer, prefix: str
) -> None:
    """An Idempotency-Key whose shard does not answer its binding: the request
    is refused with 503 and publishes nothing, since another request may hold
    the key (a publish then could be a reused key answered 200); once the
    shard answers, the same request goes through."""
    from pushd.broker.redis.sharding import shard_of

    pushd = PushdUnderTest.config(
        redis=(redis_server.address(), own_redis.address()), redis_prefix=prefix
    )
    await pushd.start()
    assert own_redis.process is not None
    key = next(f"k{n}" for n in range(1000) if shard_of(f"idempotency:k{n}", 2) == 1)
    ((channel,), _) = channels_by_shard("healthy", 2)
    headers = {"idempotency-key": [key]}
    try:
        own_redis.process.send_signal(signal.SIGSTOP)
        response = await pushd.post(channel, "1", headers=headers)
        assert (response.code, (await response.json())["error"]) == (503, "unavailable")
        history = await treq.get(f"{pushd.url}/channels/{channel}/history", persistent=False)
        assert (await history.json())["messages"] == []
        own_redis.process.send_signal(signal.SIGCONT)
        response = await pushd.post(channel, "1", headers=headers)
        assert response.code == 200, await response.text()
        other = await pushd.post(channel, "2", headers=headers)
        assert other.code == 422
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
        await pushd.stop()
