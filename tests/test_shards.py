"""Several Redis servers, each a shard (README, "Shards"): a shard that dies
fails only its own channels; batches, idempotency, node commands, counts and
/push work across shards; a node given another shard list says so."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater

from tests.support import (
    Node,
    PushdUnderTest,
    RedisServer,
    WSClient,
    channels_by_shard,
    redis_options,
    server_of,
    wait_for,
)


async def health(pushd: Any) -> tuple[int, dict[str, Any]]:
    response = await treq.get(f"{pushd.url}/health", persistent=False)
    return response.code, await response.json()


async def health_is(pushd: Any, status: str, servers: Sequence[RedisServer], down: int) -> bool:
    """/health says `status`, every shard up but `down` (an index; -1: none)."""
    code, body = await health(pushd)
    shards = [
        {"redis": f"127.0.0.1:{s.port}", "up": i != down, "same_list": True}
        for i, s in enumerate(servers)
    ]
    return (code, body["status"], body["shards"]) == (200, status, shards)


async def redis_up(pushd: PushdUnderTest) -> dict[tuple[str, str], float]:
    """/metrics' pushd_redis_up, by (shard, redis)."""
    response = await treq.get(f"{pushd.url}/metrics", persistent=False)
    series = {}
    for line in (await response.text()).splitlines():
        if line.startswith("pushd_redis_up{"):
            labels, value = line.rsplit(" ", 1)
            found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            series[(found["shard"], found["redis"])] = float(value)
    return series


async def publish_batch(pushd: Any, body: Any, key: str | None = None) -> tuple[int, Any]:
    """POST /publish: a JSON object, or a list of lines sent as NDJSON."""
    headers = {"content-type": ["application/json"]}
    if isinstance(body, list):
        data = b"".join(json.dumps(line).encode() + b"\n" for line in body)
        headers = {"content-type": ["application/x-ndjson"]}
    else:
        data = json.dumps(body).encode()
    if key is not None:
        headers["idempotency-key"] = [key]
    response = await treq.post(f"{pushd.url}/publish", data, headers=headers, persistent=False)
    return response.code, await response.json()


async def history(pushd: Any, channel: str) -> list[str]:
    response = await treq.get(f"{pushd.url}/channels/{channel}/history", persistent=False)
    assert response.code == 200
    return [m["id"] for m in (await response.json())["messages"]]


@pytest_twisted.async_yield_fixture
async def sharded(shard_servers: tuple[RedisServer, ...], prefix: str) -> AsyncIterator[Any]:
    """pushd on the session's 3 redis-servers, each a shard."""
    pushd = PushdUnderTest.config(
        redis=tuple(s.address() for s in shard_servers), redis_prefix=prefix
    )
    await pushd.start()
    yield pushd
    await pushd.stop()


@pytest_twisted.ensureDeferred
async def test_a_dead_shard_fails_only_its_channels(
    durable_redis: RedisServer,
    redis_server: RedisServer,
    more_redis: tuple[RedisServer, ...],
    prefix: str,
) -> None:
    """Publishers on channels of 3 shards, subscribers on all: shard 0 is
    SIGKILLed and started again. The other shards' channels refuse nothing and
    lose nothing; shard 0's answer 503 meanwhile and recover with `since`."""
    servers = (durable_redis, redis_server, more_redis[0])  # shard 0 keeps its data
    pushd = PushdUnderTest.config(
        redis=tuple(s.address() for s in servers), redis_prefix=prefix, history_size=1000
    )
    await pushd.start()
    try:
        by_shard = channels_by_shard("feed", 3, per_shard=2)
        dead, live = by_shard[0], by_shard[1] + by_shard[2]
        clients: dict[str, WSClient] = {}
        for channel in dead + live:
            clients[channel] = await pushd.connect(f"?channel={channel}")
            await clients[channel].next_of("subscribed")
        accepted: dict[str, list[str]] = {c: [] for c in clients}
        refused: dict[str, list[int]] = {c: [] for c in clients}
        stopping = False

        async def publisher(channel: str) -> None:
            """Message n until it is accepted (a 504 is settled by its key);
            until told to stop, and its last message is accepted."""
            n, unsettled = 0, False
            while not stopping or unsettled:
                response = await pushd.post(
                    channel,
                    json.dumps(n),
                    headers={
                        "content-type": ["application/json"],
                        "idempotency-key": [f"{channel}-{n}"],
                    },
                )
                body = await response.json()
                unsettled = response.code != 200
                if unsettled:
                    refused[channel].append(response.code)
                else:
                    accepted[channel].append(body["id"])
                    n += 1
                # Pacing, not a wait for anything: some tens of messages a channel.
                await deferLater(reactor, 0.005, lambda: None)

        publishers = [Deferred.fromCoroutine(publisher(c)) for c in clients]

        def each_has(counts: dict[str, int], more: int) -> bool:
            return all(len(accepted[c]) >= k + more for c, k in counts.items())

        await wait_for(lambda: each_has({c: 0 for c in clients}, 5), what="traffic on every shard")
        durable_redis.kill()
        await wait_for(
            lambda: health_is(pushd, "degraded", servers, down=0), what="/health: degraded"
        )
        up = await redis_up(pushd)
        assert up == {(str(i), f"127.0.0.1:{s.port}"): float(i != 0) for i, s in enumerate(servers)}
        await wait_for(
            lambda: all(503 in refused[c] for c in dead),
            what="the dead shard's channels to answer 503",
        )
        at_kill = {c: len(accepted[c]) for c in live}
        await wait_for(lambda: each_has(at_kill, 10), what="the other shards' channels to go on")
        before = {c: len(accepted[c]) for c in dead}

        durable_redis.start()
        await wait_for(lambda: health_is(pushd, "ok", servers, down=-1), what="/health: ok")
        assert set((await redis_up(pushd)).values()) == {1.0}
        await wait_for(lambda: each_has(before, 5), what="the dead shard's channels to come back")
        stopping = True
        await gatherResults(publishers)

        for channel in live:  # refused nothing, lost nothing, delivered once in order
            assert refused[channel] == [], (channel, refused[channel])
        for channel in dead:
            assert set(refused[channel]) <= {503, 504} and 503 in refused[channel]
        for channel, client in clients.items():
            frames = await client.next_many(len(accepted[channel]), "message")
            assert [f["id"] for f in frames] == accepted[channel], channel
            assert [f["data"] for f in frames] == list(range(len(accepted[channel])))
            await client.nothing_more()
            await client.close()
        for channel in dead:
            # Resuming from before the outage: everything accepted since, once.
            since = accepted[channel][1]
            client = await pushd.connect(f"?channel={channel}&since={since}")
            assert (await client.next_of("subscribed"))["recovered"] is True
            frames = await client.next_many(len(accepted[channel]) - 2, "message")
            assert [f["id"] for f in frames] == accepted[channel][2:]
            assert len(accepted[channel]) - 2 >= before[channel]
            await client.nothing_more()
            await client.close()
            assert await history(pushd, channel) == accepted[channel]
    finally:
        await pushd.stop()


@pytest_twisted.ensureDeferred
async def test_a_batch_over_a_dead_shard_is_refused_whole(
    own_redis: RedisServer,
    redis_server: RedisServer,
    more_redis: tuple[RedisServer, ...],
    prefix: str,
) -> None:
    servers = (redis_server, own_redis, more_redis[0])
    pushd = PushdUnderTest.config(redis=tuple(s.address() for s in servers), redis_prefix=prefix)
    await pushd.start()
    try:
        a, b, c = (names[0] for names in channels_by_shard("batch", 3))
        own_redis.kill()  # shard 1, b's
        await wait_for(
            lambda: health_is(pushd, "degraded", servers, down=1), what="/health: degraded"
        )
        for body, key in (
            ({"channels": [a, b, c], "data": 1}, None),
            ({"channels": [a, b, c], "data": 1}, f"{prefix}k"),
            (
                [{"channel": a, "data": 1}, {"channel": c, "data": 2}, {"channel": b, "data": 3}],
                None,
            ),
        ):
            code, answer = await publish_batch(pushd, body, key)
            assert (code, answer["error"]) == (503, "unavailable"), answer
        for channel in (a, c):  # nothing stored on the shards that are up
            assert await history(pushd, channel) == []
        # A batch on the shards that are up is taken.
        code, answer = await publish_batch(pushd, {"channels": [a, c], "data": 2})
        assert code == 200, answer
        own_redis.start()
        await wait_for(lambda: health_is(pushd, "ok", servers, down=-1), what="/health: ok")
        code, answer = await publish_batch(pushd, {"channels": [a, b, c], "data": 3}, f"{prefix}k")
        assert code == 200, answer
        assert [r["channel"] for r in answer["results"]] == [a, b, c]
        assert [len(await history(pushd, x)) for x in (a, b, c)] == [2, 1, 2]
    finally:
        await pushd.stop()


@pytest_twisted.ensureDeferred
async def test_a_batch_over_shards_with_an_idempotency_key(sharded: PushdUnderTest) -> None:
    pushd = sharded
    a, b, c = (names[0] for names in channels_by_shard("idem", 3))
    client = await pushd.connect(f"?channel={a}&channel={b}&channel={c}")
    for _ in range(3):
        await client.next_of("subscribed")
    lines = [{"channel": x, "data": n} for n, x in enumerate([a, b, c, c, b, a])]
    key = f"{pushd.cfg.redis_prefix}batch"
    code, first = await publish_batch(pushd, lines, key)
    assert code == 200, first
    assert [r["channel"] for r in first["results"]] == [a, b, c, c, b, a]
    code, again = await publish_batch(pushd, lines, key)
    assert (code, again) == (200, first)
    code, other = await publish_batch(pushd, lines[:-1], key)
    assert (code, other["error"]) == (422, "idempotency_key_reused"), other
    ids = [r["id"] for r in first["results"]]
    assert await history(pushd, a) == [ids[0], ids[5]]
    assert await history(pushd, b) == [ids[1], ids[4]]
    assert await history(pushd, c) == [ids[2], ids[3]]
    # Each message once; each channel's in order (channels of different
    # shards have no order between them).
    frames = await client.next_many(6, "message")
    for channel in (a, b, c):
        got = [(f["id"], f["data"]) for f in frames if f["channel"] == channel]
        assert got == [
            (r["id"], n) for n, r in enumerate(first["results"]) if r["channel"] == channel
        ]
    await client.nothing_more()
    await client.close()


@pytest_twisted.async_yield_fixture
async def nodes(tmp_path: Path) -> AsyncIterator[list[Node]]:
    """The test's `twistd pushd` nodes (append them started), stopped after."""
    started: list[Node] = []
    yield started
    await gatherResults([Deferred.fromCoroutine(node.terminate()) for node in started])


async def start(nodes: list[Node], node: Node) -> Node:
    node.start()
    nodes.append(node)
    await node.ready()
    return node


@pytest_twisted.ensureDeferred
async def test_a_node_with_another_shard_list_says_so(
    shard_servers: tuple[RedisServer, ...], nodes: list[Node], tmp_path: Path, prefix: str
) -> None:
    import txredisapi

    # --node-ttl 30: no node checks the list again during the test, but at start.
    first = await start(
        nodes, Node(tmp_path, *redis_options(shard_servers, prefix, "--node-ttl", "30"))
    )
    conns = [await txredisapi.Connection("127.0.0.1", s.port) for s in shard_servers]
    try:
        key = f"{prefix}!shards"

        async def written() -> bool:
            return all([await conn.exists(key) for conn in conns])

        await wait_for(written, what="the first node's shard list in every shard")
        remembered = [await conn.get(key) for conn in conns]
        assert [r.split(":")[0] for r in remembered] == ["0", "1", "2"]
        assert len({r.split(":")[1] for r in remembered}) == 1
        # A node with the same list refreshes the list's TTL (shard_map.lua):
        # once it has on every shard, it has compared its list with the first's.
        for conn in conns:
            await conn.expire(key, 100_000)
        same = await start(
            nodes, Node(tmp_path, *redis_options(shard_servers, prefix, "--node-ttl", "30"))
        )

        async def refreshed() -> bool:
            return all([await conn.ttl(key) <= 300 for conn in conns])

        await wait_for(refreshed, what="the second node to check its shard list")
        # Another order: the same servers are other shards to it.
        reordered = [shard_servers[1], shard_servers[0], shard_servers[2]]
        other = await start(nodes, Node(tmp_path, *redis_options(reordered, prefix)))
        await wait_for(
            lambda: other.output().count("shard list mismatch") == 3,
            what="the mismatch in the log, once a shard",
        )
        assert f"Redis 127.0.0.1:{shard_servers[1].port} is shard 0:" in other.output()
        for node in (first, same):
            assert "shard list mismatch" not in node.output()
        # Its /health says so too, on every shard: the lists' fingerprints differ.
        health = await (await treq.get(f"{other.url}/health", persistent=False)).json()
        assert health["status"] == "degraded"
        assert [s["same_list"] for s in health["shards"]] == [False, False, False]
        health = await (await treq.get(f"{first.url}/health", persistent=False)).json()
        assert health["status"] == "ok"
        assert [await conn.get(key) for conn in conns] == remembered
    finally:
        for conn in conns:
            await conn.disconnect()


@pytest_twisted.ensureDeferred
async def test_commands_counts_and_push_across_shards(
    shard_servers: tuple[RedisServer, ...], nodes: list[Node], tmp_path: Path, prefix: str
) -> None:
    import txredisapi

    # The gateway's lists are not prefixed: names of the test's own.
    stem = "push" + prefix.strip(":")
    events = f"{stem}-events"
    channels = [names[0] for names in channels_by_shard(stem, 3)]
    options = redis_options(shard_servers, prefix, "--node-ttl", "1", "--push-event-list", events)
    a = await start(nodes, Node(tmp_path, *options))
    b = await start(nodes, Node(tmp_path, *options))
    conns = [await txredisapi.Connection("127.0.0.1", s.port) for s in shard_servers]
    clients: list[tuple[str, WSClient]] = []
    try:
        for channel in channels:
            for node in (a, b, b):
                client = await node.connect(f"?channel={channel}")
                await client.next_of("subscribed")
                clients.append((channel, client))

        async def counted() -> bool:
            for node in (a, b):
                for channel in channels:
                    response = await treq.get(f"{node.url}/channels/{channel}", persistent=False)
                    if (await response.json())["subscribers"] != 3:
                        return False
            return True

        await wait_for(counted, what="3 subscribers a channel, seen by both nodes")

        for channel in channels:
            response = await treq.post(f"{a.url}/push?c={channel}", b"hi", persistent=False)
            entry = await response.text()
            assert entry.startswith("S|"), entry
            home = shard_servers.index(server_of(channel, shard_servers))
            for index, conn in enumerate(conns):
                stored = await conn.execute_command("LRANGE", channel, 0, -1)
                listed = await conn.execute_command("LRANGE", events, 0, -1)
                if index == home:
                    assert stored == [f"{entry[2:]}|hi"] and listed == [channel]
                else:
                    assert (stored, listed) == ([], [])
                await conn.delete(events)
        for channel, client in clients:
            frame = await client.next_of("message")
            assert (frame["channel"], frame["data"]) == (channel, "hi")

        for channel in channels:
            response = await treq.delete(f"{a.url}/channels/{channel}", persistent=False)
            assert (response.code, await response.json()) == (200, {"nodes": 2})
        for channel, client in clients:
            assert await client.next_of("unsubscribed") == {
                "type": "unsubscribed",
                "channel": channel,
            }
            await client.nothing_more()
    finally:
        for _, client in clients:
            await client.close()
        for conn in conns:
            await conn.delete([*channels, events])
            await conn.disconnect()
