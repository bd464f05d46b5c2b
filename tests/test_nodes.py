"""Many pushd processes on one Redis behave as one."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest_twisted
import treq
from twisted.internet import defer

from tests.support import SECRET, Node, RedisServer, redis_options, token, wait_for


@pytest_twisted.async_yield_fixture
async def cluster(
    redis_server: RedisServer, tmp_path: Path, prefix: str
) -> AsyncIterator[Callable[[int], list[Node]]]:
    """Start n `twistd pushd` nodes sharing the session Redis and a prefix."""
    nodes: list[Node] = []

    async def start(n: int) -> list[Node]:
        # A dead node's counts go within a second (--node-ttl), not the default 6.
        options = redis_options([redis_server], prefix, "--node-ttl", "1")
        started = [Node(tmp_path, *options) for _ in range(n)]
        for node in started:
            node.start()
        nodes.extend(started)
        await defer.gatherResults([defer.Deferred.fromCoroutine(n.ready()) for n in started])
        return started

    yield start  # type: ignore[misc]
    # With the reactor running, so the tests' clients answer the nodes' goodbyes.
    await defer.gatherResults([defer.Deferred.fromCoroutine(node.terminate()) for node in nodes])


async def subscribers(node: Node, channel: str) -> int:
    response = await treq.get(f"{node.url}/channels/{channel}", persistent=False)
    return (await response.json())["subscribers"]


@pytest_twisted.ensureDeferred
async def test_a_message_posted_anywhere_reaches_every_node_once(cluster) -> None:  # type: ignore[no-untyped-def]
    nodes = await cluster(3)
    clients = [await node.connect("?channel=news") for node in nodes for _ in range(2)]
    for client in clients:
        await client.next_of("subscribed")
    ids = [await node.publish("news", n) for n, node in zip(range(30), itertools.cycle(nodes))]
    for client in clients:
        got = [await client.next_of("message") for _ in ids]
        assert [f["id"] for f in got] == ids
        assert [f["data"] for f in got] == list(range(30))
        await client.nothing_more()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_subscriber_counts_add_up_over_nodes_and_forget_dead_ones(cluster) -> None:  # type: ignore[no-untyped-def]
    nodes = await cluster(3)
    clients = []
    for k, node in enumerate(nodes, start=1):
        for _ in range(k):
            clients.append(await node.connect("?channel=room"))
    for client in clients:
        await client.next_of("subscribed")

    async def counted(n: int) -> bool:
        counts = [await subscribers(node, "room") for node in nodes if node.process]
        return counts == [n] * len(counts)

    await wait_for(lambda: counted(6), what="6 subscribers seen by every node")
    nodes[2].kill()
    await wait_for(lambda: counted(3), timeout=5, what="the dead node to stop counting")


@pytest_twisted.ensureDeferred
async def test_a_killed_node_comes_back_and_its_clients_lose_nothing(cluster) -> None:  # type: ignore[no-untyped-def]
    a, b = await cluster(2)
    client = await a.connect("?channel=feed")
    await client.next_of("subscribed")
    accepted = [await b.publish("feed", n) for n in range(5)]
    seen = [(await client.next_of("message"))["id"] for _ in range(5)]
    assert seen == accepted

    a.kill()
    await client.closed
    accepted += [await b.publish("feed", n) for n in range(5, 15)]
    a.start()
    await a.ready()
    client = await a.connect(f"?channel=feed&since={seen[-1]}")
    assert (await client.next_of("subscribed"))["recovered"] is True
    accepted += [await b.publish("feed", n) for n in range(15, 20)]
    seen += [(await client.next_of("message"))["id"] for _ in range(15)]
    assert seen == accepted
    await client.nothing_more()
    await client.close()


@pytest_twisted.ensureDeferred
async def test_an_idempotency_key_holds_across_nodes(cluster) -> None:  # type: ignore[no-untyped-def]
    a, b = await cluster(2)
    answers = []
    for node in (a, b, a):
        response = await treq.post(
            f"{node.url}/channels/orders",
            b"paid",
            headers={"idempotency-key": ["pay-7"]},
            persistent=False,
        )
        answers.append(await response.json())
    assert answers[0] == answers[1] == answers[2]
    response = await treq.get(f"{b.url}/channels/orders/history", persistent=False)
    assert len((await response.json())["messages"]) == 1


@pytest_twisted.ensureDeferred
async def test_a_client_publish_reaches_every_node_and_the_history(
    redis_server: RedisServer, tmp_path: Path, prefix: str
) -> None:
    options = (
        "--redis", f"redis://127.0.0.1:{redis_server.port}", "--redis-prefix", prefix,
        "--token-secret", SECRET,
    )  # fmt: skip
    a, b = Node(tmp_path, *options), Node(tmp_path, *options)
    for node in (a, b):
        node.start()
    try:
        for node in (a, b):
            await node.ready()
        writer = await a.connect(f"?channel=chat&token={token(None, ['chat'], ['chat'])}")
        reader = await b.connect(f"?channel=chat&token={token(None, ['chat'])}")
        for client in (writer, reader):
            await client.next_of("subscribed")
        writer.send({"type": "publish", "channel": "chat", "data": "hi all"})
        mine, theirs = await writer.next_of("message"), await reader.next_of("message")
        assert mine == theirs and mine["data"] == "hi all"
        response = await treq.get(f"{b.url}/channels/chat/history", persistent=False)
        assert [m["id"] for m in (await response.json())["messages"]] == [mine["id"]]
        await writer.close()
        await reader.close()
    finally:
        a.stop()
        b.stop()
