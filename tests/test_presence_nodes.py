"""Presence over several `twistd pushd` processes: one Redis and shards, users
with several connections, a node SIGKILLed or stopped, Redis losing its data."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer

from tests.support import SECRET, Node, RedisServer, redis_options, token, wait_for


def cli(server: RedisServer, *args: str) -> str:
    out = subprocess.run(
        ["redis-cli", "-p", str(server.port), *args], capture_output=True, check=True, timeout=10
    )
    return out.stdout.decode()


#: A token without user.
ANYONE = token(None, ["*"])
#: A dead node's members go within this (--node-ttl 2, a reaping a second).
GONE_WITHIN = 6


@pytest.fixture(params=["redis", "shards"])
def servers(request: pytest.FixtureRequest, redis_server: RedisServer) -> Sequence[RedisServer]:
    if request.param == "redis":
        return (redis_server,)
    servers: Sequence[RedisServer] = request.getfixturevalue("shard_servers")
    return servers


@pytest_twisted.async_yield_fixture
async def cluster(
    servers: Sequence[RedisServer], tmp_path: Path, prefix: str
) -> AsyncIterator[Callable[[int], Any]]:
    nodes: list[Node] = []

    async def start(n: int) -> list[Node]:
        options = redis_options(
            servers,
            prefix,
            "--node-ttl",
            "2",
            "--presence",
            "room:*",
            "--join-leave",
            "room:*",
            "--token-secret",
            SECRET,
        )
        started = [Node(tmp_path, *options) for _ in range(n)]
        for node in started:
            node.start()
        nodes.extend(started)
        await defer.gatherResults([defer.Deferred.fromCoroutine(n.ready()) for n in started])
        return started

    yield start
    await defer.gatherResults([defer.Deferred.fromCoroutine(node.terminate()) for node in nodes])


async def presence(node: Node, channel: str) -> dict[str, Any]:
    response = await treq.get(f"{node.url}/channels/{channel}/presence", persistent=False)
    body: dict[str, Any] = await response.json()
    assert response.code == 200, body
    return body


async def everyone_sees(nodes: Sequence[Node], channel: str, count: int, users: int) -> bool:
    for node in nodes:
        body = await presence(node, channel)
        if (body["count"], body["users"]) != (count, users):
            return False
    return True


async def frames_until(client: Any, test: Callable[[dict[str, Any]], bool]) -> list[Any]:
    """Frames up to and including the first that passes `test`."""
    seen = []
    while True:
        frame = await client.next()
        seen.append(frame)
        if test(frame):
            return seen


@pytest_twisted.ensureDeferred
async def test_three_nodes_share_members_and_forget_a_killed_one(cluster) -> None:  # type: ignore[no-untyped-def]
    a, b, c = await cluster(3)
    watcher = await a.connect(f"?channel=room:1&token={token('watcher', ['*'])}")
    clients = [watcher]
    # Users with several connections, on several nodes.
    for node, user in ((a, "ann"), (b, "ann"), (b, "bo"), (c, "bo"), (c, "cy"), (c, "cy")):
        info = {"on": node.port}
        clients.append(await node.connect(f"?channel=room:1&token={token(user, ['*'], info=info)}"))
    for client in clients:
        await frames_until(client, lambda f: f["type"] == "subscribed" and f["channel"] == "room:1")

    await wait_for(lambda: everyone_sees((a, b, c), "room:1", 7, 4), what="7 members everywhere")
    body = await presence(b, "room:1")
    on_c = {m["client"] for m in body["clients"] if m["info"] == {"on": c.port}}
    assert len(on_c) == 3
    # The watcher hears every other member join (possibly its own too).
    joins: set[str] = set()
    while len(joins - {None}) < 6:
        frame = await watcher.next()
        if frame["type"] == "join":
            joins.add(frame["member"]["client"])

    c.kill()
    await wait_for(
        lambda: everyone_sees((a, b), "room:1", 4, 3),
        timeout=GONE_WITHIN,
        what="the killed node's members to go",
    )
    left: set[str] = set()
    while left != on_c:
        frame = await watcher.next(timeout=GONE_WITHIN)
        if frame["type"] == "leave":
            left.add(frame["member"]["client"])
    for client in clients[:4]:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_stopped_node_leaves_at_once(cluster) -> None:  # type: ignore[no-untyped-def]
    a, b = await cluster(2)
    watcher = await a.connect(f"?channel=room:2&token={ANYONE}")
    await watcher.next_of("subscribed")
    there = [await b.connect(f"?channel=room:2&token={ANYONE}") for _ in range(3)]
    for client in there:
        await client.next_of("subscribed")
    await wait_for(lambda: everyone_sees((a,), "room:2", 4, 0), what="4 members")
    stopping = defer.Deferred.fromCoroutine(b.terminate())
    for client in there:
        await client.closed
    await stopping
    # Gone for readers at once; their leaves announced by the node that reaps them.
    await wait_for(lambda: everyone_sees((a,), "room:2", 1, 0), timeout=2, what="1 member")
    leaves = 0
    while leaves < 3:
        frame = await watcher.next(timeout=GONE_WITHIN)
        leaves += frame["type"] == "leave"
    await watcher.close()


@pytest_twisted.ensureDeferred
async def test_members_come_back_after_redis_loses_them(  # type: ignore[no-untyped-def]
    cluster, servers: Sequence[RedisServer], prefix: str
) -> None:
    (a,) = await cluster(1)
    clients = [await a.connect(f"?channel=room:{n}&token={ANYONE}") for n in range(6)]
    for client in clients:
        await client.next_of("subscribed")
    channels = [f"room:{n}" for n in range(6)]

    async def all_there() -> bool:
        for channel in channels:
            if (await presence(a, channel))["count"] != 1:
                return False
        return True

    assert await all_there()
    # Every key of these nodes gone, as when Redis restarts empty.
    drop = "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end"
    for server in servers:
        cli(server, "EVAL", drop, "0", prefix + "*")
    # Written again from the node's own members within a refresh or two.
    await wait_for(all_there, timeout=GONE_WITHIN, what="the members written again")
    for client in clients:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_garbage_in_a_presence_hash_is_not_listed(  # type: ignore[no-untyped-def]
    cluster, servers: Sequence[RedisServer], prefix: str
) -> None:
    from tests.support import server_of

    (a,) = await cluster(1)
    client = await a.connect(f"?channel=room:x&token={ANYONE}")
    await client.next_of("subscribed")
    body = await presence(a, "room:x")
    node = body["clients"][0]["client"].split(".")[0]
    redis = server_of("room:x", servers)
    key = f"{prefix}{{room:x}}:presence"
    # Another process's writes under a live node's name: counted (Redis
    # cannot tell), never listed unless they are members.
    cli(redis, "HSET", key, f"{node}.x1", "not a member")
    cli(redis, "HSET", key, f"{node}.x2", '3:uab{"client":1}')
    cli(redis, "HSET", key, f"{node}.x3", "9999999:u")
    cli(redis, "HSET", key, "deadnode.1", '0:{"client":"deadnode.1","user":null,"info":null}')

    # The dead node's entry is not counted; the others are (Redis cannot tell),
    # once the node's answer of a second ago is not reused.
    async def counted() -> bool:
        return bool((await presence(a, "room:x"))["count"] == 4)

    await wait_for(counted, timeout=3, what="the next read")
    body = await presence(a, "room:x")
    assert len(body["clients"]) == 1 and body["clients"][0]["client"].startswith(node + ".")
    await client.close()


@pytest_twisted.ensureDeferred
async def test_a_leave_is_announced_though_its_node_dies_before_it_could(cluster) -> None:  # type: ignore[no-untyped-def]
    """The leave is stored as a tombstone until announced: a node killed in
    the window (its leave stored, not yet sent) is reaped by another, which
    announces it. Whatever the node got to before the kill, the watcher
    hears the leave."""
    a, b = await cluster(2)
    watcher = await a.connect(f"?channel=room:k&token={ANYONE}")
    await watcher.next_of("subscribed")
    goer = await b.connect(f"?channel=room:k&token={token('goer', ['*'])}")
    await frames_until(goer, lambda f: f["type"] == "subscribed" and f["channel"] == "room:k")
    await frames_until(watcher, lambda f: f["type"] == "join" and f["member"]["user"] == "goer")
    await goer.close()
    assert b.process is not None
    b.process.send_signal(signal.SIGSTOP)  # within the window, as a kill would be
    b.kill()
    await frames_until(watcher, lambda f: f["type"] == "leave" and f["member"]["user"] == "goer")
    await wait_for(lambda: everyone_sees((a,), "room:k", 1, 0), what="the watcher alone")
    await watcher.close()
