"""Presence, tried from outside by a newcomer (issue 17, protocol.md "Presence",
README "## Presence"): real redis-servers, real `twistd -n pushd` nodes, real
WebSocket/SSE/NDJSON clients, polls with deadlines. Each test's docstring
says what a user would see.

Defects found this way, each now fixed (the test named says how it looked):
- test_a_leave_just_before_sigterm_is_announced: a leave waiting in the
  coalescing window was dropped by a graceful stop (now: a stopping node sends
  what it holds).
- test_unsubscribe_subscribe_unsubscribe_leaves_a_ghost,
  test_leaves_right_after_redis_came_back_are_announced,
  test_a_storm_on_a_node_just_started: the coalescing dropped a pending join
  WITH the leave after it even when subscribers had heard of that client:
  watchers kept a ghost (now: only a client's first word cancels out).
- test_redis_back_from_an_older_snapshot: Redis back from a snapshot (or a
  lagging replica) went unnoticed (now: another run id, the members are
  written again).
- test_one_bad_presence_key_stops_presence_of_every_channel: one presence key
  of the wrong type made every write of that node fail (now: that key is left
  alone, and said once).
- test_a_forged_presence_payload_on_a_channel_without_join_leave: a foreign
  PUBLISH starting with the presence marker became a join frame on any
  channel (now: only where --join-leave is on, and of the exact shape).
The others pass and check what no other test does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet import defer

from tests.support import (
    SECRET,
    Node,
    RedisServer,
    connect_ws,
    redis_options,
    token,
    wait_for,
)

#: A token without user.
ANYONE = token(None, ["*"])


def cli(server: RedisServer, *args: str) -> str:
    out = subprocess.run(
        ["redis-cli", "-p", str(server.port), *args], capture_output=True, check=True, timeout=10
    )
    return out.stdout.decode()


def cli_x(server: RedisServer, payload: bytes, *args: str) -> str:
    """redis-cli -x: `payload` (any bytes, NUL included) as the last argument."""
    out = subprocess.run(
        ["redis-cli", "-p", str(server.port), "-x", *args],
        input=payload,
        capture_output=True,
        check=True,
        timeout=10,
    )
    return out.stdout.decode()


@pytest_twisted.async_yield_fixture
async def cluster(tmp_path: Path, prefix: str) -> AsyncIterator[Callable[..., Any]]:
    """start(servers, n, *more options) -> n nodes on `servers` (--node-ttl 2)."""
    nodes: list[Node] = []

    async def start(servers: Sequence[RedisServer], n: int, *more: str) -> list[Node]:
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
            *more,
        )
        started = [Node(tmp_path, *options) for _ in range(n)]
        for node in started:
            node.start()
        nodes.extend(started)
        await defer.gatherResults([defer.Deferred.fromCoroutine(n.ready()) for n in started])
        return started

    yield start
    for node in nodes:
        if node.process is not None:
            node.process.send_signal(signal.SIGCONT)
    await defer.gatherResults([defer.Deferred.fromCoroutine(node.terminate()) for node in nodes])


async def presence(node: Node, channel: str) -> dict[str, Any]:
    response = await treq.get(f"{node.url}/channels/{channel}/presence", persistent=False)
    body: dict[str, Any] = await response.json()
    assert response.code == 200, body
    return body


async def counts(node: Node, channel: str) -> tuple[int, int]:
    body = await presence(node, channel)
    return body["count"], body["users"]


def stored_users(server: RedisServer, prefix: str, channel: str) -> list[Any]:
    """The users of the members Redis itself holds for `channel` (any node,
    alive or not): what the nodes wrote, whatever a node's answer cache says."""
    out = cli(server, "--no-raw", "HVALS", f"{prefix}{{{channel}}}:presence")
    users = []
    for line in out.splitlines():
        value = line.split(") ", 1)[-1]
        if value.startswith('"'):
            value = json.loads(value)
        member = value[value.index("{") :]
        users.append(json.loads(member)["user"])
    return sorted(users, key=str)


async def subscribed(client: Any, channel: str) -> list[Any]:
    """Frames up to and including `subscribed` of `channel`."""
    seen = []
    while True:
        frame = await client.next()
        seen.append(frame)
        if frame["type"] == "subscribed" and frame["channel"] == channel:
            return seen


async def next_type(client: Any, kind: str) -> Any:
    """The next frame of type `kind`, join and leave events skipped (and the
    personal channel's `subscribed`, which may come after the room's)."""
    while True:
        frame = await client.next()
        if frame["type"] == kind:
            return frame
        if frame["type"] == "subscribed" and frame["channel"].startswith("user#"):
            continue
        assert frame["type"] in ("join", "leave"), frame


async def until_event(client: Any, kind: str, member: str, timeout: float) -> list[Any]:
    """Frames up to the `kind` (join/leave) event of client id `member`."""
    seen: list[Any] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            frame = await client.next(timeout=max(0.01, left))
        except defer.TimeoutError:
            raise AssertionError(f"no {kind} of {member} within {timeout} s; got {seen}") from None
        seen.append(frame)
        if frame["type"] == kind and frame["member"]["client"] == member:
            return seen


# -- Redis refusing writes for a moment (maxmemory reached)


@pytest_twisted.ensureDeferred
async def test_a_leave_while_redis_refuses_writes_is_not_counted_forever(
    cluster, own_redis: RedisServer
) -> None:
    """A Redis at its maxmemory (noeviction) refuses writes with an OOM error
    for a moment (CONFIG SET maxmemory 1), then has room again. A member that
    left during that moment is not counted once Redis takes writes again: the
    error reply is taken as "unavailable" and the node writes its members
    again (passes)."""
    (a,) = await cluster((own_redis,), 1)
    stays = await a.connect(f"?channel=room:oom&token={token('stays', ['*'])}")
    goes = await a.connect(f"?channel=room:oom&token={token('goes', ['*'])}")
    await subscribed(stays, "room:oom")
    await subscribed(goes, "room:oom")
    assert await counts(a, "room:oom") == (2, 2)

    cli(own_redis, "CONFIG", "SET", "maxmemory", "1")
    try:
        await goes.close()
        # Give the node a moment to try (and fail) its write: polled, not slept.
        await wait_for(
            lambda: "errorstat_OOM" in cli(own_redis, "INFO", "errorstats"),
            timeout=5,
            what="the node's write to be refused",
        )
    finally:
        cli(own_redis, "CONFIG", "SET", "maxmemory", "0")

    async def truth() -> bool:
        return await counts(a, "room:oom") == (1, 1)

    await wait_for(truth, timeout=10, what="the member that left to be gone")
    await stays.close()


# -- a graceful stop right after a member left


@pytest_twisted.ensureDeferred
async def test_a_leave_just_before_sigterm_is_announced(
    cluster, own_redis: RedisServer, prefix: str
) -> None:
    """A member of node B leaves, and B is stopped (SIGTERM, a deploy) within
    the 0.25 s its leave event waits to be coalesced. A watcher on node A that
    heard the member join never hears it leave: B drops its waiting events on
    stop, and the node that reaps B does not see the member any more (B had
    already removed it from Redis). The watcher's member list keeps a ghost
    for good. Expected: every member that leaves is eventually announced
    (README: "subscribers ... receive leave when a member ... goes on any
    node")."""
    a, b = await cluster((own_redis,), 2)
    watcher = await a.connect(f"?channel=room:bye&token={token('watcher', ['*'])}")
    await subscribed(watcher, "room:bye")
    goes = await b.connect(f"?channel=room:bye&token={token('goes', ['*'])}")
    await subscribed(goes, "room:bye")
    body = await presence(b, "room:bye")
    (member,) = [m["client"] for m in body["clients"] if m["user"] == "goes"]
    await until_event(watcher, "join", member, timeout=5)

    await goes.close()
    # B has written the leave (seen in Redis): stop B at once, inside the window.
    await wait_for(
        lambda: stored_users(own_redis, prefix, "room:bye") == ["watcher"],
        timeout=5,
        what="the leave written",
    )
    await b.terminate()
    await until_event(watcher, "leave", member, timeout=10)
    await watcher.close()


async def _count_is(node: Node, channel: str, count: int) -> bool:
    response = await treq.get(f"{node.url}/channels/{channel}/presence", persistent=False)
    body = await response.json()
    return response.code == 200 and body["count"] == count


class Roster:
    """What a subscriber knows of a channel's members from join and leave
    events alone, kept by client id as the README says to."""

    def __init__(self, client: Any, channel: str) -> None:
        self.client = client
        self.channel = channel
        self.members: dict[str, Any] = {}
        self.events = 0
        self.frames: list[Any] = []
        self.last: Any = None
        self._running = defer.Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        while True:
            frame = await self.client.frames.get()
            self.frames.append(frame)
            if frame.get("channel") != self.channel:
                continue
            if frame["type"] == "join":
                self.events += 1
                self.members[frame["member"]["client"]] = frame["member"]
            elif frame["type"] == "leave":
                self.events += 1
                self.members.pop(frame["member"]["client"], None)


async def truth(node: Node, channel: str) -> set[str]:
    return {m["client"] for m in (await presence(node, channel))["clients"]}


# -- the bus: a presence payload from another process


@pytest_twisted.ensureDeferred
async def test_a_forged_presence_payload_on_a_channel_without_join_leave(
    cluster, own_redis: RedisServer, prefix: str
) -> None:
    """Any process may PUBLISH to `<prefix><channel>`; README "Straight from
    Redis": whatever its bytes, subscribers receive it as data with "id": null
    and "it is never taken for one of pushd's own messages". A payload that
    starts with the presence marker is taken for a join event even on `news`,
    a channel without --presence or --join-leave: the subscriber gets
    {"type":"join",...} with whatever member (and extra fields) the
    publisher chose, a frame the protocol only sends on --join-leave
    channels. Expected: delivered as data with "id": null, as any foreign
    payload."""
    (a,) = await cluster((own_redis,), 1)
    client = await a.connect(f"?channel=news&token={ANYONE}")
    await subscribed(client, "news")
    forged = (
        b'\x00pushd-presence/1\n{"type":"join","channel":"news","member":'
        b'{"client":"boss.1","user":"ceo","info":{"admin":true}},"x":1}'
    )
    cli_x(own_redis, forged, "PUBLISH", f"{prefix}news")
    frame = await client.next()
    assert frame["type"] == "message" and frame["id"] is None, frame
    await client.close()


# -- a node frozen (SIGSTOP) past --node-ttl, then thawed


@pytest_twisted.ensureDeferred
async def test_a_frozen_node_leaves_and_comes_back(cluster, own_redis: RedisServer) -> None:
    """Node B is SIGSTOPped past --node-ttl: a watcher on A hears its members
    leave and the counts drop; B is SIGCONTed: its members count again and the
    watcher hears them join (passes)."""
    a, b = await cluster((own_redis,), 2)
    watcher = await a.connect(f"?channel=room:ice&token={token('w', ['*'])}")
    await subscribed(watcher, "room:ice")
    roster = Roster(watcher, "room:ice")
    on_b = [await b.connect(f"?channel=room:ice&token={token(f'u{i}', ['*'])}") for i in range(5)]
    for client in on_b:
        await subscribed(client, "room:ice")
    everyone = await truth(a, "room:ice")
    assert len(everyone) == 6
    await wait_for(
        lambda: set(roster.members) >= everyone - {None} and len(roster.members) >= 5,
        timeout=5,
        what="joins",
    )
    assert b.process is not None
    b.process.send_signal(signal.SIGSTOP)
    try:
        await wait_for(lambda: _count_is(a, "room:ice", 1), timeout=8, what="B's members to go")
        await wait_for(lambda: len(roster.members) <= 1, timeout=8, what="B's leaves")
    finally:
        b.process.send_signal(signal.SIGCONT)
    await wait_for(lambda: _count_is(a, "room:ice", 6), timeout=8, what="B's members back")
    await wait_for(lambda: len(roster.members) >= 5, timeout=8, what="B's joins")
    await wait_for(lambda: _converged(a, roster), timeout=8, what="roster = truth")
    for client in on_b:
        await client.close()
    await wait_for(lambda: _count_is(a, "room:ice", 1), timeout=8, what="leaves")
    await wait_for(lambda: _converged(a, roster), timeout=8, what="roster = truth at the end")


async def _converged(node: Node, roster: Roster) -> bool:
    now = await truth(node, roster.channel)
    # The watcher may or may not have heard itself: compare the others.
    mine = set(roster.members)
    roster.last = (sorted(mine), sorted(now))
    return mine - now == set() and len(now - mine) <= 1


# -- a reconnect storm


@pytest_twisted.ensureDeferred
async def test_a_reconnect_storm_converges_and_leaves_no_keys(
    cluster, own_redis: RedisServer, prefix: str
) -> None:
    """Three nodes; 300 clients connect and disconnect at once, twice, spread
    over the nodes. Afterwards every node counts only the watcher, the watcher's
    roster built from join/leave alone agrees, it heard no more than the
    coalescing allows, and once the watcher left too no presence key of the
    channel or of the nodes is left in Redis (passes)."""
    nodes = await cluster((own_redis,), 3)
    watcher = await nodes[0].connect(f"?channel=room:storm&token={token('w', ['*'])}")
    await subscribed(watcher, "room:storm")
    roster = Roster(watcher, "room:storm")
    started = time.monotonic()
    for _round in range(2):
        connects = [
            nodes[i % 3].connect(f"?channel=room:storm&token={token(f'u{i % 40}', ['*'])}")
            for i in range(300)
        ]
        clients = await defer.gatherResults([defer.ensureDeferred(c) for c in connects])
        await defer.gatherResults(
            [defer.ensureDeferred(subscribed(c, "room:storm")) for c in clients]
        )
        await defer.gatherResults([defer.ensureDeferred(c.close()) for c in clients])
    for node in nodes:
        await wait_for(lambda node=node: _count_is(node, "room:storm", 1), timeout=10, what="1")
    await wait_for(lambda: _converged(nodes[0], roster), timeout=10, what="roster = truth")
    elapsed = time.monotonic() - started
    # At most 50 events a 0.25 s window per node (plus one window of slack each).
    assert roster.events <= 3 * 200 * (elapsed + 1), (roster.events, elapsed)
    await watcher.close()

    async def no_keys() -> bool:
        keys = cli(own_redis, "--scan", "--pattern", f"{prefix}*").split()
        left = [k for k in keys if "presence" in k or "!reaping" in k]
        return not left

    await wait_for(no_keys, timeout=10, what="no presence keys left")


# -- Redis restarting empty


@pytest_twisted.ensureDeferred
async def test_redis_restarting_empty_under_two_nodes(cluster, own_redis: RedisServer) -> None:
    """Redis is SIGKILLed and started again, empty, on the same port, under two
    nodes with members: the counts come back to the truth on both nodes and a
    watcher's roster agrees with them (passes)."""
    a, b = await cluster((own_redis,), 2)
    watcher = await a.connect(f"?channel=room:phoenix&token={token('w', ['*'])}")
    await subscribed(watcher, "room:phoenix")
    roster = Roster(watcher, "room:phoenix")
    clients = []
    for i in range(6):
        node = (a, b)[i % 2]
        clients.append(await node.connect(f"?channel=room:phoenix&token={token(f'u{i}', ['*'])}"))
    await defer.gatherResults(
        [defer.ensureDeferred(subscribed(c, "room:phoenix")) for c in clients]
    )
    await wait_for(lambda: _count_is(b, "room:phoenix", 7), timeout=5, what="7")
    await wait_for(lambda: roster.events >= 6, timeout=5, what="6 joins")
    own_redis.kill()
    before = len(roster.frames)
    own_redis.start()
    # Clients come and go while the nodes find Redis again.
    await clients.pop().close()
    for node in (a, b):
        await wait_for(lambda node=node: _count_is(node, "room:phoenix", 6), timeout=15, what="6")
    await wait_for(lambda: _converged(a, roster), timeout=10, what="roster = truth")
    # The members written again are announced again (README): let those go
    # out before they leave (leaving right after is
    # test_leaves_right_after_redis_came_back_are_announced).
    remaining = await truth(a, "room:phoenix")

    def joined_again() -> bool:
        again = {f["member"]["client"] for f in roster.frames[before:] if f["type"] == "join"}
        return again >= remaining

    await wait_for(joined_again, timeout=5, what="the joins again")
    for client in clients:
        await client.close()
    await wait_for(lambda: _count_is(b, "room:phoenix", 1), timeout=10, what="1")
    try:
        await wait_for(lambda: _converged(a, roster), timeout=10, what="roster = truth at end")
    except AssertionError:
        raise AssertionError(f"roster, truth: {roster.last}; frames {roster.frames}") from None


# -- a SIGKILLed node: what it leaves in Redis


@pytest_twisted.ensureDeferred
async def test_a_killed_node_leaves_nothing_behind_in_redis(
    cluster, own_redis: RedisServer, prefix: str
) -> None:
    """Node B has members in 60 channels (more than one reaping batch) and is
    SIGKILLed: within 10 s no member of B is counted anywhere, and nothing of
    B is left in Redis (its presence set, its !nodes entry, the !reaping
    entry, its fields in the channels' hashes) (passes)."""
    a, b = await cluster((own_redis,), 2)
    channels = "&".join(f"channel=room:k{i}" for i in range(60))
    clients = [await b.connect(f"?{channels}&token={token(f'u{i}', ['*'])}") for i in range(3)]
    for client in clients:
        acked: set[str] = set()
        while len(acked) < 60:
            frame = await client.next()
            if frame["type"] == "subscribed":
                acked.add(frame["channel"])
    body = await presence(a, "room:k59")
    node_b = body["clients"][0]["client"].split(".")[0]
    assert body["count"] == 3
    b.kill()

    async def gone() -> bool:
        for i in (0, 30, 59):
            if not await _count_is(a, f"room:k{i}", 0):
                return False
        keys = cli(own_redis, "--scan", "--pattern", f"{prefix}*").split()
        if any("presence" in k for k in keys):
            return False
        if node_b in cli(own_redis, "ZRANGE", f"{prefix}!nodes", "0", "-1"):
            return False
        return node_b not in cli(own_redis, "ZRANGE", f"{prefix}!reaping", "0", "-1")

    await wait_for(gone, timeout=12, what="B gone from Redis")


# -- coalescing: a leave swallowed with a join that was not the first


@pytest_twisted.ensureDeferred
async def test_unsubscribe_subscribe_unsubscribe_leaves_a_ghost(
    cluster, own_redis: RedisServer
) -> None:
    """A client whose join everybody heard unsubscribes, subscribes again and
    unsubscribes again within the 0.25 s coalescing window (a flaky UI
    toggling a room). Its node coalesces leave+join into one pending join,
    then drops that join together with the last leave ("a client that joins
    and leaves within that time is never announced"): the watcher never hears
    it leave and shows it forever, while GET /presence no longer lists it.
    Expected: the watcher's roster (join/leave by client id) ends as the truth."""
    a, b = await cluster((own_redis,), 2)
    watcher = await a.connect(f"?channel=room:flap&token={token('w', ['*'])}")
    await subscribed(watcher, "room:flap")
    roster = Roster(watcher, "room:flap")
    flappy = await b.connect(f"?channel=room:flap&token={token('flappy', ['*'])}")
    await subscribed(flappy, "room:flap")
    (member,) = [
        m["client"] for m in (await presence(b, "room:flap"))["clients"] if m["user"] == "flappy"
    ]
    await wait_for(lambda: member in roster.members, timeout=5, what="flappy's join")

    flappy.send({"type": "unsubscribe", "channel": "room:flap"})
    await next_type(flappy, "unsubscribed")
    flappy.send({"type": "subscribe", "channel": "room:flap"})
    await subscribed(flappy, "room:flap")
    flappy.send({"type": "unsubscribe", "channel": "room:flap"})
    await next_type(flappy, "unsubscribed")
    await wait_for(lambda: _count_is(a, "room:flap", 1), timeout=5, what="1 member")
    try:
        await wait_for(lambda: member not in roster.members, timeout=5, what="flappy's leave")
    except AssertionError:
        raise AssertionError(f"frames: {roster.frames}") from None
    await flappy.close()
    await watcher.close()


@pytest_twisted.ensureDeferred
async def test_leaves_right_after_redis_came_back_are_announced(
    cluster, own_redis: RedisServer, prefix: str
) -> None:
    """Redis restarts empty; a node writes its members again and announces
    them as joins (README). Members that leave within 0.25 s of that are never
    announced as leaving: their re-join is still waiting and is dropped with
    the leave, though every watcher heard their first join. The watcher keeps
    them for good. Expected: every leave heard, roster = GET /presence."""
    (a,) = await cluster((own_redis,), 1)
    watcher = await a.connect(f"?channel=room:back&token={token('w', ['*'])}")
    await subscribed(watcher, "room:back")
    roster = Roster(watcher, "room:back")
    clients = [
        await a.connect(f"?channel=room:back&token={token(f'u{i}', ['*'])}") for i in range(4)
    ]
    for client in clients:
        await subscribed(client, "room:back")
    await wait_for(lambda: len(roster.members) >= 4, timeout=5, what="4 joins")
    own_redis.kill()
    own_redis.start()
    # Written again (seen in Redis itself: a node may answer GET /presence
    # from its cache). Then they all leave at once.
    await wait_for(
        lambda: cli(own_redis, "HLEN", f"{prefix}{{room:back}}:presence").strip() == "5",
        timeout=15,
        what="written again",
    )
    await defer.gatherResults([defer.ensureDeferred(c.close()) for c in clients])
    await wait_for(lambda: _count_is(a, "room:back", 1), timeout=5, what="1 member")
    try:
        await wait_for(lambda: _converged(a, roster), timeout=5, what="roster = truth")
    except AssertionError:
        raise AssertionError(f"roster, truth: {roster.last}; frames {roster.frames}") from None
    await watcher.close()


# -- garbage in Redis: one presence key of the wrong type


@pytest_twisted.ensureDeferred
async def test_one_bad_presence_key_stops_presence_of_every_channel(
    cluster, own_redis: RedisServer, prefix: str
) -> None:
    """Another process (a mistyped redis-cli, an application sharing the
    prefix) leaves a string at `<prefix>{room:bad}:presence`. A client joins
    room:bad and room:ok together (one write): from then on room:ok's members
    of that node are never counted (GET /presence says 0 on every node),
    however long one waits, and neither is any member joining any channel
    later: every write of the node fails on the bad key and is retried as a
    rewrite that fails on it too. Expected: only room:bad is affected."""
    a, b = await cluster((own_redis,), 2)
    cli(own_redis, "SET", f"{prefix}{{room:bad}}:presence", "oops")
    both = await a.connect(f"?channel=room:bad&channel=room:ok&token={ANYONE}")
    acked: set[str] = set()
    while len(acked) < 2:
        frame = await both.next()
        if frame["type"] == "subscribed":
            acked.add(frame["channel"])
    later = await a.connect(f"?channel=room:later&token={ANYONE}")
    await subscribed(later, "room:later")
    await wait_for(lambda: _count_is(b, "room:later", 1), timeout=6, what="room:later counted")
    await wait_for(lambda: _count_is(b, "room:ok", 1), timeout=6, what="room:ok counted on B")
    await both.close()
    await later.close()


# -- odd user ids


@pytest_twisted.ensureDeferred
async def test_odd_user_ids_are_counted_and_listed(cluster, own_redis: RedisServer) -> None:
    """Users whose ids are unicode, lone surrogates (JSON may escape one),
    contain ':' or '.', or are 3,000 characters long (a longer token is
    refused with 431), or empty: each is one user, listed as it came in the
    token, on both nodes, in valid JSON (passes)."""
    a, b = await cluster((own_redis,), 2)
    odd = ["ünï©ødé 😀", "\ud800", "\udc00", "a:b.c", "u" * 3000, "", "0:"]
    clients = []
    for i, user in enumerate(odd):
        node = (a, b)[i % 2]
        clients.append(
            await connect_ws(
                node.port,
                "/ws?channel=room:odd",
                headers={"Authorization": f"Bearer {token(user, ['*'])}"},
            )
        )
    # Two connections of one user.
    clients.append(await a.connect(f"?channel=room:odd&token={token(odd[0], ['*'])}"))
    for client in clients:
        await subscribed(client, "room:odd")
    for node in (a, b):
        response = await treq.get(f"{node.url}/channels/room:odd/presence", persistent=False)
        body = json.loads(await response.content())
        assert (body["count"], body["users"]) == (len(odd) + 1, len(odd)), body["count"]
        assert sorted(m["user"] for m in body["clients"]) == sorted([*odd, odd[0]])
    clients[0].send({"type": "presence", "channel": "room:odd"})
    frame = await next_type(clients[0], "presence")
    assert frame["users"] == len(odd)
    for client in clients:
        await client.close()
    await wait_for(lambda: _count_is(a, "room:odd", 0), timeout=5, what="0")


# -- --workers 2


def children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


@pytest_twisted.ensureDeferred
async def test_workers_are_nodes_of_their_own(cluster, own_redis: RedisServer) -> None:
    """`--workers 2` next to a plain node A: the workers' members are counted
    by A, a SIGKILLed worker's members leave (announced to a watcher on A)
    and its replacement starts clean; SIGTERM of the parent makes every
    member go, announced (passes)."""
    (a,) = await cluster((own_redis,), 1)
    parent = Node(a.directory, *a.options, "--workers", "2")
    parent.start()
    try:
        await parent.workers_ready()
        assert parent.process is not None
        watcher = await a.connect(f"?channel=room:w&token={token('w', ['*'])}")
        await subscribed(watcher, "room:w")
        roster = Roster(watcher, "room:w")
        clients = [
            await parent.connect(f"?channel=room:w&token={token(f'u{i}', ['*'])}")
            for i in range(12)
        ]
        for client in clients:
            await subscribed(client, "room:w")
        await wait_for(lambda: _count_is(a, "room:w", 13), timeout=5, what="13")
        body = await presence(a, "room:w")
        nodes = {m["client"].split(".")[0] for m in body["clients"] if m["user"] != "w"}
        await wait_for(lambda: len(roster.members) >= 12, timeout=5, what="12 joins")
        workers = children(parent.process.pid)
        assert len(workers) == 2
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        survivors = [c for c in clients if not c.closed.called]
        await wait_for(
            lambda: sum(not c.closed.called for c in clients) < 12 or len(nodes) == 1,
            timeout=5,
            what="the victim's clients to be cut",
        )
        alive = sum(not c.closed.called for c in clients)
        # A dead worker's members go within --node-ttl and a reaper's turn: more
        # than 10 s on a machine busy with the suite (a CI run missed it once).
        await wait_for(lambda: _count_is(a, "room:w", 1 + alive), timeout=20, what="victim gone")
        await wait_for(lambda: _converged(a, roster), timeout=10, what="roster after the kill")
        survivors = [c for c in clients if not c.closed.called]
        del survivors
        await parent.terminate()
        await wait_for(lambda: _count_is(a, "room:w", 1), timeout=10, what="all gone")
        try:
            await wait_for(lambda: _converged(a, roster), timeout=10, what="roster at the end")
        except AssertionError:
            raise AssertionError(f"roster, truth: {roster.last}") from None
        await watcher.close()
    finally:
        parent.stop()


# -- user channels


@pytest_twisted.ensureDeferred
async def test_presence_on_user_channels(cluster, own_redis: RedisServer) -> None:
    """`--presence 'dm#*'`: alice and bob (two tabs) in dm#alice,bob are 3
    members, 2 users, listed by GET /channels/dm%23alice,bob/presence and by
    the presence frame; carol may not subscribe, and gets `forbidden` for
    the presence frame (passes)."""
    (a,) = await cluster((own_redis,), 1, "--presence", "dm#*")
    chan = "dm#alice,bob"
    q = "?channel=dm%23alice,bob&token="
    alice = await a.connect(q + token("alice", ["dm#*"]))
    bob = await a.connect(q + token("bob", ["dm#*"]))
    bob2 = await a.connect(q + token("bob", ["dm#*"]))
    for client in (alice, bob, bob2):
        await subscribed(client, chan)
    response = await treq.get(f"{a.url}/channels/dm%23alice,bob/presence", persistent=False)
    body = await response.json()
    assert response.code == 200, body
    assert (body["channel"], body["count"], body["users"]) == (chan, 3, 2)
    alice.send({"type": "presence", "channel": chan})
    frame = await next_type(alice, "presence")
    assert (frame["count"], frame["users"]) == (3, 2)
    carol = await a.connect(f"?token={token('carol', ['*'])}")
    # Her personal channel's acknowledgement first: it may come after the error.
    await subscribed(carol, "user#carol")
    carol.send({"type": "presence", "channel": chan})
    error = await next_type(carol, "error")
    assert error["code"] == "forbidden", error
    for client in (alice, bob, bob2, carol):
        await client.close()


# -- shards: one shard frozen past --node-ttl


@pytest_twisted.ensureDeferred
async def test_a_frozen_shard_then_back(cluster, tmp_path: Path) -> None:
    """Three shards (three redis-servers), two nodes, members in a channel of
    each shard. The Redis of one shard is SIGSTOPped past --node-ttl, then
    SIGCONTed: the other shards' channels keep their exact counts meanwhile,
    and afterwards every channel's count and every watcher's roster come back
    to the truth (passes)."""
    from tests.support import channels_by_shard, free_port

    servers = []
    for n in range(3):
        directory = tmp_path / f"r{n}"
        directory.mkdir()
        server = RedisServer(free_port(), directory)
        server.start()
        servers.append(server)
    try:
        a, b = await cluster(servers, 2)
        chans = [group[0] for group in channels_by_shard("room:s", 3)]
        watchers, rosters, clients = [], [], []
        for chan in chans:
            w = await a.connect(f"?channel={chan}&token={token('w', ['*'])}")
            await subscribed(w, chan)
            watchers.append(w)
            rosters.append(Roster(w, chan))
            for i in range(3):
                c = await b.connect(f"?channel={chan}&token={token(f'u{i}', ['*'])}")
                await subscribed(c, chan)
                clients.append(c)
        for chan in chans:
            await wait_for(lambda chan=chan: _count_is(a, chan, 4), timeout=5, what="4")
        frozen = servers[1].process
        assert frozen is not None
        frozen.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            # One member of each channel leaves meanwhile.
            for k in range(3):
                await clients[k * 3].close()
            for k in (0, 2):
                await wait_for(lambda k=k: _count_is(a, chans[k], 3), timeout=5, what="3")
            # The freeze lasts past --node-ttl (2 s): the scenario's length, not a wait.
            await wait_for(lambda: time.monotonic() - frozen_at > 3.5, timeout=10, what="3.5 s")
        finally:
            frozen.send_signal(signal.SIGCONT)
        for chan in chans:
            for node in (a, b):
                await wait_for(
                    lambda node=node, chan=chan: _count_is(node, chan, 3),
                    timeout=15,
                    what=f"{chan}: 3",
                )
        for roster in rosters:
            try:
                await wait_for(
                    lambda roster=roster: _converged(a, roster), timeout=10, what="roster"
                )
            except AssertionError:
                raise AssertionError(f"{roster.channel}: {roster.last}") from None
        for c in clients + watchers:
            await c.close()
    finally:
        for server in servers:
            if server.process is not None:
                server.process.send_signal(signal.SIGCONT)
            server.stop()


# -- a graceful stop with many members


@pytest_twisted.ensureDeferred
async def test_sigterm_with_many_members(cluster, own_redis: RedisServer, prefix: str) -> None:
    """Node B with 400 members (40 users, 10 connections each) is stopped
    with SIGTERM: A stops counting them at once, a watcher on A hears all 400
    leave within the coalescing rate (50 a 0.25 s window), and nothing of B is
    left in Redis (passes)."""
    a, b = await cluster((own_redis,), 2)
    watcher = await a.connect(f"?channel=room:many&token={token('w', ['*'])}")
    await subscribed(watcher, "room:many")
    roster = Roster(watcher, "room:many")
    connects = [
        b.connect(f"?channel=room:many&token={token(f'u{i % 40}', ['*'])}") for i in range(400)
    ]
    clients = await defer.gatherResults([defer.ensureDeferred(c) for c in connects])
    await defer.gatherResults([defer.ensureDeferred(subscribed(c, "room:many")) for c in clients])
    await wait_for(lambda: _count_is(a, "room:many", 401), timeout=10, what="401")
    body = await presence(a, "room:many")
    assert body["users"] == 41
    node_b = next(m["client"] for m in body["clients"] if m["user"] != "w").split(".")[0]
    await wait_for(lambda: len(roster.members) >= 400, timeout=10, what="400 joins")
    await b.terminate()
    await wait_for(lambda: _count_is(a, "room:many", 1), timeout=3, what="1 at once")
    await wait_for(lambda: len(roster.members) <= 1, timeout=10, what="400 leaves")

    async def clean() -> bool:
        keys = cli(own_redis, "--scan", "--pattern", f"{prefix}*").split()
        nodes = cli(own_redis, "ZRANGE", f"{prefix}!nodes", "0", "-1")
        reaping = cli(own_redis, "ZRANGE", f"{prefix}!reaping", "0", "-1")
        fields = cli(own_redis, "HKEYS", f"{prefix}{{room:many}}:presence")
        return not any(node_b in k for k in keys) and node_b not in nodes + reaping + fields

    await wait_for(clean, timeout=5, what="B gone from Redis")
    await watcher.close()


# -- the bus: garbage after the presence marker


@pytest_twisted.ensureDeferred
async def test_garbage_after_the_presence_marker(
    cluster, own_redis: RedisServer, prefix: str
) -> None:
    """PUBLISH to `<prefix>room:g` (a --join-leave channel) of payloads that
    start with the presence marker but are not presence events (no line, an
    empty line, a bad line after a good one, another channel, a CR, invalid
    UTF-8, a member without client, an unknown type): each reaches the subscriber
    as data with "id": null, nothing else, and the node keeps working
    (passes)."""
    (a,) = await cluster((own_redis,), 1)
    client = await a.connect(f"?channel=room:g&token={ANYONE}")
    await subscribed(client, "room:g")
    marker = b"\x00pushd-presence/1\n"
    good = b'{"type":"join","channel":"room:g","member":{"client":"x.1","user":null,"info":null}}'
    payloads = [
        marker,
        marker + b"\n",
        marker + good + b"\n",
        marker + good + b"\nnope",
        marker + good.replace(b"room:g", b"room:h"),
        marker + good + b"\r",
        marker + b'{"type":"join","channel":"room:g","member":{"client":"\xff"}}',
        marker + b'{"type":"leave","channel":"room:g","member":{"user":"x"}}',
        marker + b'{"type":"kick","channel":"room:g","member":{"client":"x.1"}}',
    ]
    for n, payload in enumerate(payloads):
        cli_x(own_redis, payload, "PUBLISH", f"{prefix}room:g")
        try:
            frame = await next_type(client, "message")
        except defer.TimeoutError:
            raise AssertionError(f"payload {n}: nothing") from None
        assert frame["id"] is None, (n, frame)
    # A well-formed one is a join (the bus is trusted as far as pushd's format goes).
    cli_x(own_redis, marker + good, "PUBLISH", f"{prefix}room:g")
    frame = await client.next()
    assert frame["type"] == "join" and frame["member"]["client"] == "x.1", frame
    await a.publish("room:g", "still alive")
    frame = await next_type(client, "message")
    assert frame["data"] == "still alive"
    await client.close()


# -- Redis restarting from an older snapshot


@pytest_twisted.ensureDeferred
async def test_redis_back_from_an_older_snapshot(
    cluster, own_redis: RedisServer, prefix: str
) -> None:
    """Redis with RDB snapshots crashes and comes back from its last snapshot,
    taken a moment before. Since then one member left and another joined.
    After the restart GET /presence counts the member that left (a ghost, for
    as long as its node lives) and not the one that joined: neither the node
    (its entry is still in the snapshot, so it does not write its members
    again) nor the epoch check (the snapshot has the same !epoch) notices
    that Redis went back in time. Expected: the counts come back to the
    truth, as after Redis restarting empty."""
    a, b = await cluster((own_redis,), 2)
    old = await b.connect(f"?channel=room:rdb&token={token('old', ['*'])}")
    stays = await b.connect(f"?channel=room:rdb&token={token('stays', ['*'])}")
    await subscribed(old, "room:rdb")
    await subscribed(stays, "room:rdb")
    await wait_for(lambda: _count_is(a, "room:rdb", 2), timeout=5, what="2")
    cli(own_redis, "SAVE")
    await old.close()
    new = await b.connect(f"?channel=room:rdb&token={token('new', ['*'])}")
    await subscribed(new, "room:rdb")
    await wait_for(
        lambda: stored_users(own_redis, prefix, "room:rdb") == ["new", "stays"],
        timeout=5,
        what="the leave and the join written",
    )
    own_redis.kill()
    own_redis.start()  # loads dump.rdb from its directory

    async def truth_again() -> bool:
        response = await treq.get(f"{a.url}/channels/room:rdb/presence", persistent=False)
        body = await response.json()
        if response.code != 200:
            return False
        return sorted(m["user"] for m in body["clients"]) == ["new", "stays"]

    try:
        await wait_for(truth_again, timeout=15, what="stays and new, not old")
    except AssertionError:
        body = await presence(a, "room:rdb")
        raise AssertionError(f"after 15 s: {body}") from None
    await stays.close()
    await new.close()


# -- a node cut off from Redis past --node-ttl, then back


class Cut:
    """A TCP proxy to a redis-server that the test can cut (every connection
    dropped, new ones refused) and mend: a network partition of one node."""

    def __init__(self, target: int) -> None:
        from twisted.protocols.portforward import ProxyFactory

        from tests.support import free_port

        self.port = free_port()
        self.factory = ProxyFactory("127.0.0.1", target)
        self.listening: Any = None
        self.protocols: set[Any] = set()
        proxy = self

        base = self.factory.protocol

        class Tracked(base):  # type: ignore[misc,valid-type]
            def connectionMade(self) -> None:
                proxy.protocols.add(self)
                super().connectionMade()

            def connectionLost(self, reason: Any) -> None:
                proxy.protocols.discard(self)
                super().connectionLost(reason)

        self.factory.protocol = Tracked

    def mend(self) -> None:
        from twisted.internet import reactor

        self.listening = reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")

    async def cut(self) -> None:
        await self.listening.stopListening()
        for protocol in list(self.protocols):
            protocol.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_a_node_cut_off_past_node_ttl_then_back(
    cluster, own_redis: RedisServer, tmp_path: Path, prefix: str
) -> None:
    """Node B reaches Redis through a link that is cut for 4 s (--node-ttl 2)
    while its 3 members stay connected to it; one of them leaves during the
    cut. A counts them gone and its watcher hears them leave; once the link is
    back B writes its 2 remaining members again: every node counts them, the
    watcher hears them join, and its roster = the truth (passes)."""
    (a,) = await cluster((own_redis,), 1)
    link = Cut(own_redis.port)
    link.mend()
    options = list(a.options)
    options[options.index(f"redis://127.0.0.1:{own_redis.port}")] = f"redis://127.0.0.1:{link.port}"
    b = Node(tmp_path, *options)
    b.start()
    try:
        await b.ready()
        watcher = await a.connect(f"?channel=room:cut&token={token('w', ['*'])}")
        await subscribed(watcher, "room:cut")
        roster = Roster(watcher, "room:cut")
        on_b = [
            await b.connect(f"?channel=room:cut&token={token(f'u{i}', ['*'])}") for i in range(3)
        ]
        for client in on_b:
            await subscribed(client, "room:cut")
        await wait_for(lambda: len(roster.members) >= 3, timeout=5, what="3 joins")
        await link.cut()
        cut_at = time.monotonic()
        await wait_for(lambda: _count_is(a, "room:cut", 1), timeout=8, what="B taken for dead")
        await wait_for(lambda: len(roster.members) <= 1, timeout=8, what="B's leaves")
        await on_b.pop().close()
        # The cut lasts 4 s: the scenario's length, not a wait for something.
        await wait_for(lambda: time.monotonic() - cut_at > 4, timeout=10, what="4 s")
        link.mend()
        await wait_for(lambda: _count_is(a, "room:cut", 3), timeout=10, what="B's 2 back")
        await wait_for(lambda: _count_is(b, "room:cut", 3), timeout=10, what="B counts them")
        try:
            await wait_for(lambda: _converged(a, roster), timeout=5, what="roster = truth")
        except AssertionError:
            raise AssertionError(f"{roster.last} {roster.frames}") from None
        for client in on_b:
            await client.close()
        await wait_for(lambda: _count_is(a, "room:cut", 1), timeout=5, what="1")
        await watcher.close()
    finally:
        await b.terminate()
        if link.listening is not None and link.listening.connected:
            await link.listening.stopListening()


# -- Redis frozen (SIGSTOP) past --node-ttl under every node


@pytest_twisted.ensureDeferred
async def test_redis_frozen_past_node_ttl(cluster, own_redis: RedisServer) -> None:
    """Redis is SIGSTOPped for 4 s (--node-ttl 2) under three nodes with
    members: when it runs again every node finds the others (and maybe
    itself) dead and reaps them. Within a few seconds the counts are exact
    again on every node and a watcher's roster is the truth (passes)."""
    nodes = await cluster((own_redis,), 3)
    watcher = await nodes[0].connect(f"?channel=room:nap&token={token('w', ['*'])}")
    await subscribed(watcher, "room:nap")
    roster = Roster(watcher, "room:nap")
    clients = []
    for i in range(9):
        clients.append(
            await nodes[i % 3].connect(f"?channel=room:nap&token={token(f'u{i}', ['*'])}")
        )
    for client in clients:
        await subscribed(client, "room:nap")
    await wait_for(lambda: len(roster.members) >= 9, timeout=5, what="9 joins")
    assert own_redis.process is not None
    own_redis.process.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        await wait_for(lambda: time.monotonic() - stopped_at > 4, timeout=10, what="4 s")
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
    for node in nodes:
        await wait_for(lambda node=node: _count_is(node, "room:nap", 10), timeout=15, what="10")
    try:
        await wait_for(lambda: _converged(nodes[0], roster), timeout=10, what="roster = truth")
    except AssertionError:
        raise AssertionError(f"{roster.last}") from None
    for client in clients:
        await client.close()
    await watcher.close()


# -- a storm is paced, and nothing of it is dropped

#: A bus observer of its own (not slowed by the test's 600 clients): prints
#: "<monotonic time> <events in the payload>" for each presence payload.
OBSERVER = r"""
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"SUBSCRIBE " + sys.argv[2].encode() + b"\r\n")
f = s.makefile("rb")
def read():
    line = f.readline()
    if line[:1] == b"*":
        return [read() for _ in range(int(line[1:]))]
    if line[:1] == b"$":
        data = f.read(int(line[1:]) + 2)[:-2]
        return data
    return line.strip()
while True:
    item = read()
    if isinstance(item, list) and item[0] == b"message":
        payload = item[2]
        if payload.startswith(b"\x00pushd-presence/1\n"):
            print(time.monotonic(), payload.count(b"\n"), flush=True)
"""


@pytest_twisted.ensureDeferred
async def test_a_storm_is_paced_and_complete(
    cluster, own_redis: RedisServer, prefix: str, tmp_path: Path
) -> None:
    """600 clients connect to node B at once, stay, then all leave at once. A
    watcher on A hears each join and each leave, each client's leave last; on the bus (seen
    by an observer process of its own) B's payloads carry at most 50 events
    each and come one a 0.25 s window (passes)."""
    import sys

    a, b = await cluster((own_redis,), 2)
    log = (tmp_path / "bus.txt").open("w")
    observer = subprocess.Popen(
        [sys.executable, "-c", OBSERVER, str(own_redis.port), f"{prefix}room:pace"], stdout=log
    )
    try:
        watcher = await a.connect(f"?channel=room:pace&token={token('w', ['*'])}")
        await subscribed(watcher, "room:pace")
        stamps: list[tuple[str, str]] = []

        async def listen() -> None:
            while True:
                frame = await watcher.frames.get()
                if frame["type"] in ("join", "leave"):
                    stamps.append((frame["type"], frame["member"]["client"]))

        listening = defer.Deferred.fromCoroutine(listen())
        connects = [
            b.connect(f"?channel=room:pace&token={token(f'u{i}', ['*'])}") for i in range(600)
        ]
        clients = await defer.gatherResults([defer.ensureDeferred(c) for c in connects])
        await defer.gatherResults(
            [defer.ensureDeferred(subscribed(c, "room:pace")) for c in clients]
        )
        await wait_for(lambda: sum(t == "join" for t, _ in stamps) >= 600, timeout=15, what="joins")
        await defer.gatherResults([defer.ensureDeferred(c.close()) for c in clients])
        await wait_for(
            lambda: sum(t == "leave" for t, _ in stamps) >= 600, timeout=15, what="leaves"
        )
        joins = [c for t, c in stamps if t == "join"]
        leaves = [c for t, c in stamps if t == "leave"]
        # Every one heard; a join may come twice (seen: the first 50 again when
        # the node's first write, a rewrite, ends after their window was sent).
        assert len(set(joins)) in (600, 601)
        assert len(set(leaves)) == len(leaves) == 600
        # Per client, the last event is its leave.
        last: dict[str, str] = {}
        for t, c in stamps:
            last[c] = t
        assert sum(t == "join" for t in last.values()) <= 1
        listening.cancel()
        await watcher.close()
    finally:
        observer.kill()
        observer.wait()
        log.close()
    payloads = [line.split() for line in (tmp_path / "bus.txt").read_text().splitlines()]
    sizes = [int(n) for _, n in payloads]
    assert max(sizes) <= 50, sizes
    times = [float(t) for t, _ in payloads if True]
    # B's payloads (A sends only the watcher's own join): spaced by the window.
    b_times = [t for t, n in zip(times, sizes, strict=False) if n > 1]
    # Six payloads take five windows (1.25 s) at least; 0.25 s of slack for
    # the observer's own delays on a busy machine.
    spans = [later - earlier for earlier, later in zip(b_times, b_times[5:], strict=False)]
    assert min(spans) >= 1.0, spans


@pytest_twisted.ensureDeferred
async def test_a_storm_on_a_node_just_started(cluster, own_redis: RedisServer) -> None:
    """A node B just started (a deploy) gets a reconnect storm: 600 clients
    connect, and each leaves as soon as it is subscribed. B's first presence
    write is a rewrite of all its members; when it ends after the first window
    went out, B announces the members it wrote as joins a second time, and the
    leave of such a member cancels that second join together with itself. A
    watcher on A heard the first join and never hears the leave: ghosts in
    its member list, for good, while GET /presence counts 1. Expected: the
    roster built from join/leave ends as the truth."""
    (a,) = await cluster((own_redis,), 1)
    watcher = await a.connect(f"?channel=room:deploy&token={token('w', ['*'])}")
    await subscribed(watcher, "room:deploy")
    roster = Roster(watcher, "room:deploy")
    (b,) = await cluster((own_redis,), 1)

    async def visit(i: int) -> None:
        client = await b.connect(f"?channel=room:deploy&token={token(f'u{i}', ['*'])}")
        await subscribed(client, "room:deploy")
        await client.close()

    await defer.gatherResults([defer.ensureDeferred(visit(i)) for i in range(600)])
    await wait_for(lambda: _count_is(a, "room:deploy", 1), timeout=10, what="1")
    try:
        await wait_for(lambda: _converged(a, roster), timeout=10, what="roster = truth")
    except AssertionError:
        ghosts = sorted(set(roster.members) - await truth(a, "room:deploy"))
        seen = [(f["type"], f["member"]["client"]) for f in roster.frames if f.get("member")]
        heard = [[t for t, c in seen if c == ghost] for ghost in ghosts[:3]]
        raise AssertionError(f"{len(ghosts)} ghosts, e.g. {ghosts[:3]} heard {heard}") from None
    await watcher.close()


# -- memory under churn


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest_twisted.ensureDeferred
async def test_churn_does_not_grow_memory(cluster, own_redis: RedisServer, prefix: str) -> None:
    """Rounds of 300 clients joining and leaving 30 presence channels (new
    client ids every time): pushd's RSS after round 6 is within 3 MB of the
    one after round 2, and Redis's presence keys are gone after each round
    (passes)."""
    (b,) = await cluster((own_redis,), 1)
    assert b.process is not None
    sizes = []
    for _round in range(6):
        connects = [
            b.connect(f"?channel=room:c{i % 30}&token={token(f'u{i}', ['*'])}") for i in range(300)
        ]
        clients = await defer.gatherResults([defer.ensureDeferred(c) for c in connects])
        await defer.gatherResults(
            [defer.ensureDeferred(next_type(c, "subscribed")) for c in clients]
        )
        await defer.gatherResults([defer.ensureDeferred(c.close()) for c in clients])
        await wait_for(lambda: _count_is(b, "room:c0", 0), timeout=10, what="0")

        async def no_hashes() -> bool:
            keys = cli(own_redis, "--scan", "--pattern", f"{prefix}{{room:c*}}:presence").split()
            return not keys

        await wait_for(no_hashes, timeout=10, what="no presence hash left")
        sizes.append(rss_kb(b.process.pid))
    assert sizes[-1] - sizes[1] < 3000, sizes


# -- SSE and NDJSON members cut off abruptly


@pytest_twisted.ensureDeferred
async def test_sse_and_ndjson_members_cut_abruptly(cluster, own_redis: RedisServer) -> None:
    """SSE and NDJSON subscribers of two presence channels on node B, each a
    member of both under one client id; their TCP connections are reset
    (a phone losing signal): A counts them gone in both channels and a watcher
    hears them leave (passes)."""
    from tests.support import connect_raw

    a, b = await cluster((own_redis,), 2)
    watcher = await a.connect(f"?channel=room:t1&token={token('w', ['*'])}")
    await subscribed(watcher, "room:t1")
    roster = Roster(watcher, "room:t1")
    raws = []
    for path, user in (("sse", "s"), ("stream", "n")):
        raw = await connect_raw(b.port)
        raw.transport.write(
            f"GET /{path}?channel=room:t1&channel=room:t2&token={token(user, ['*'])} "
            "HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        await raw.until(b"subscribed")
        raws.append(raw)
    await wait_for(lambda: _count_is(a, "room:t1", 3), timeout=5, what="3")
    await wait_for(lambda: _count_is(a, "room:t2", 2), timeout=5, what="2")
    ids = {m["user"]: m["client"] for m in (await presence(a, "room:t2"))["clients"]}
    assert ids == {
        m["user"]: m["client"]
        for m in (await presence(a, "room:t1"))["clients"]
        if m["user"] != "w"
    }
    await wait_for(lambda: len(roster.members) >= 2, timeout=5, what="2 joins")
    for raw in raws:
        raw.transport.abortConnection()
    await wait_for(lambda: _count_is(a, "room:t1", 1), timeout=5, what="1")
    await wait_for(lambda: _count_is(a, "room:t2", 0), timeout=5, what="0")
    await wait_for(lambda: _converged(a, roster), timeout=5, what="their leaves")
    await watcher.close()


# -- read-your-join, on every node


@pytest_twisted.ensureDeferred
async def test_a_member_is_everywhere_once_subscribed(cluster, own_redis: RedisServer) -> None:
    """Right after its `subscribed` frame a client finds itself in its own
    presence frame and in GET /presence of another node; right after its
    `unsubscribed` frame its node no longer lists it (passes)."""
    a, b = await cluster((own_redis,), 2)
    for n in range(20):
        client = await b.connect(f"?token={token(f'u{n}', ['*'])}")
        client.send({"type": "subscribe", "channel": f"room:ryw{n}"})
        await subscribed(client, f"room:ryw{n}")
        client.send({"type": "presence", "channel": f"room:ryw{n}"})
        frame = await next_type(client, "presence")
        assert frame["count"] == 1 and frame["clients"][0]["user"] == f"u{n}", frame
        assert await _count_is(a, f"room:ryw{n}", 1)
        client.send({"type": "unsubscribe", "channel": f"room:ryw{n}"})
        await next_type(client, "unsubscribed")
        assert await _count_is(b, f"room:ryw{n}", 0)
        await client.close()


# -- SIGTERM in the middle of a storm


@pytest_twisted.ensureDeferred
async def test_sigterm_in_the_middle_of_a_storm(
    cluster, own_redis: RedisServer, prefix: str
) -> None:
    """Node B is stopped with SIGTERM while 400 clients are connecting to it:
    afterwards A counts only its own watcher and no member of B is left in
    the channel's hash (passes)."""
    a, b = await cluster((own_redis,), 2)
    watcher = await a.connect(f"?channel=room:mid&token={token('w', ['*'])}")
    await subscribed(watcher, "room:mid")

    async def visit(i: int) -> None:
        try:
            client = await b.connect(f"?channel=room:mid&token={token(f'u{i}', ['*'])}")
            await client.closed
        except Exception:
            return

    storm = defer.gatherResults(
        [defer.ensureDeferred(visit(i)) for i in range(400)], consumeErrors=True
    )

    async def some() -> bool:
        return (await presence(a, "room:mid"))["count"] >= 50

    await wait_for(some, timeout=10, what="50 members")
    stopping = defer.ensureDeferred(b.terminate())
    await storm
    await stopping
    await wait_for(lambda: _count_is(a, "room:mid", 1), timeout=10, what="only the watcher")

    async def clean() -> bool:
        fields = cli(own_redis, "HKEYS", f"{prefix}{{room:mid}}:presence").split()
        return len(fields) <= 1

    await wait_for(clean, timeout=10, what="B's members gone from the hash")
    await watcher.close()


# -- unsubscribe while the subscribe is under way


@pytest_twisted.ensureDeferred
async def test_unsubscribe_during_subscribe(cluster, own_redis: RedisServer) -> None:
    """50 connections each send subscribe and unsubscribe of a presence
    channel back to back, 10 times, without waiting, then stay connected:
    every node ends counting 0 members, and a last subscribe counts 1 per
    connection (passes)."""
    a, b = await cluster((own_redis,), 2)
    clients = [await b.connect(f"?token={ANYONE}") for _ in range(50)]
    for client in clients:
        for _ in range(10):
            client.send({"type": "subscribe", "channel": "room:race"})
            client.send({"type": "unsubscribe", "channel": "room:race"})
    kinds: set[str] = set()
    for client in clients:
        client.send({"type": "ping"})
        while (frame := await client.next())["type"] != "pong":
            kinds.add(frame.get("code") or frame["type"])
    for node in (a, b):
        await wait_for(lambda node=node: _count_is(node, "room:race", 0), timeout=5, what="0")
    for client in clients:
        client.send({"type": "subscribe", "channel": "room:race"})
    for client in clients:
        while (await client.next())["type"] != "subscribed":
            pass
    for node in (a, b):
        await wait_for(lambda node=node: _count_is(node, "room:race", 50), timeout=5, what="50")
    for client in clients:
        await client.close()
    await wait_for(lambda: _count_is(a, "room:race", 0), timeout=5, what="0 at the end")
