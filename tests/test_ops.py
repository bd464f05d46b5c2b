"""What operators rely on: /health, /metrics, and a graceful stop."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest_twisted
import treq

from tests.sse import open_sse
from tests.support import Node, PushdUnderTest, RedisServer, StartPushd, wait_for


@pytest_twisted.ensureDeferred
async def test_health_follows_the_broker(own_redis: RedisServer) -> None:
    # Not once per broker_kind: the Redis half would be the same test twice.
    memory = PushdUnderTest.config()
    await memory.start()
    response = await treq.get(f"{memory.url}/health", persistent=False)
    assert response.code == 200
    assert (await response.json())["status"] == "ok"
    await memory.stop()

    pushd = PushdUnderTest.config(redis=own_redis.address(), redis_prefix="health:")
    await pushd.start()
    try:
        response = await treq.get(f"{pushd.url}/health", persistent=False)
        body = await response.json()
        assert (response.code, body["broker"], body["status"]) == (200, "redis", "ok")
        own_redis.kill()

        async def down() -> bool:
            return (await treq.get(f"{pushd.url}/health", persistent=False)).code == 503

        await wait_for(down, what="/health to say 503")
        own_redis.start()

        async def up() -> bool:
            return (await treq.get(f"{pushd.url}/health", persistent=False)).code == 200

        await wait_for(up, timeout=20, what="/health to say 200 again")
    finally:
        await pushd.stop()


@pytest_twisted.ensureDeferred
async def test_metrics(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(api_key=("k",))
    auth = {"authorization": ["Bearer k"]}
    # Without --metrics-key, loopback scrapes need no key (tests/test_metrics.py: who may).
    assert (await treq.get(f"{pushd.url}/metrics", persistent=False)).code == 200
    clients = [await pushd.connect("?channel=m") for _ in range(3)]
    for client in clients:
        await client.next_of("subscribed")
    await pushd.post("m", "x", headers=auth)
    for client in clients:
        await client.next_of("message")
    response = await treq.get(f"{pushd.url}/metrics", headers=auth, persistent=False)
    assert response.code == 200
    text = await response.text()
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
             for line in text.splitlines() if line and not line.startswith("#")}  # fmt: skip
    assert lines['pushd_connections{transport="websocket"}'] == 3
    assert lines["pushd_subscriptions"] == 3
    assert lines['pushd_messages_published_total{api="channels"}'] == 1
    assert lines["pushd_deliveries_total"] == 3
    assert lines["pushd_broker_up"] == 1
    assert lines["pushd_publish_seconds_count"] == 1
    for client in clients:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_sigterm_says_goodbye_and_clients_recover_on_another_node(
    redis_server: RedisServer, tmp_path: Path, prefix: str
) -> None:
    options = ("--redis", f"redis://127.0.0.1:{redis_server.port}", "--redis-prefix", prefix)
    a, b = Node(tmp_path, *options), Node(tmp_path, *options)
    a.start()
    b.start()
    try:
        await a.ready()
        await b.ready()
        ws = await a.connect("?channel=feed")
        await ws.next_of("subscribed")
        sse = await open_sse(f"{a.url}/sse?channel=feed")
        await sse.next()
        first = await b.publish("feed", 1)
        last_seen = (await ws.next_of("message"))["id"]
        assert last_seen == first

        assert a.process is not None
        a.process.send_signal(signal.SIGTERM)
        _, code, _ = await ws.closed
        assert code == 1001
        await sse.ended  # the stream ended, cleanly
        assert a.process.wait(10) in (0, -signal.SIGTERM)
        a.process = None

        missed = [await b.publish("feed", n) for n in range(2, 5)]
        again = await b.connect(f"?channel=feed&since={last_seen}")
        assert (await again.next_of("subscribed"))["recovered"] is True
        assert [(await again.next_of("message"))["id"] for _ in missed] == missed
        await again.close()
    finally:
        a.stop()
        b.stop()
