"""Presence through `pushd.client`: `Subscriber.presence()`, its `on_join`/`on_leave`,
and `Publisher.presence()`, against a real pushd (`twistd`, as operators run it)
with `--presence 'room:*' --join-leave 'room:*'`, on the memory broker and on Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from pushd.client import Publisher, PushdError, Subscriber
from tests.support import SECRET, Node, RedisServer, redis_options, token, wait_for, with_timeout

PRESENCE = ("--presence", "room:*", "--join-leave", "room:*")


@pytest.fixture(params=["memory", "redis"])
def node_options(
    request: pytest.FixtureRequest, redis_server: RedisServer, prefix: str
) -> tuple[str, ...]:
    more = ("--token-secret", SECRET, *PRESENCE)
    if request.param == "memory":
        return more
    return redis_options([redis_server], prefix, *more)


@pytest_twisted.async_yield_fixture
async def node(tmp_path: Path, node_options: tuple[str, ...]) -> AsyncIterator[Node]:
    node = Node(tmp_path, *node_options)
    node.start()
    try:
        await node.ready()
        yield node
    finally:
        node.stop()


def subscriber(node: Node, user: str, channels: str | list[str], **kwargs: Any) -> Subscriber:
    info = kwargs.pop("info", None)
    claims = {"info": info} if info is not None else {}
    return Subscriber(node.url, channels, token=token(user, channels=["*"], **claims), **kwargs)


def by_client(members: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["client"]: m for m in members}


@pytest_twisted.ensureDeferred
async def test_subscriber_asks_presence_and_hears_joins_and_leaves(node: Node) -> None:
    joins: list[dict[str, Any]] = []
    leaves: list[dict[str, Any]] = []
    alice = subscriber(
        node,
        "alice",
        "room:1",
        info={"name": "Alice"},
        on_join=joins.append,
        on_leave=leaves.append,
    )
    bob = subscriber(node, "bob", "room:1")
    alice_again = subscriber(node, "alice", ["room:1", "lobby"])
    try:
        # Right after its subscription a member is in the answer itself (pushd stores
        # it before `subscribed`); presence() waits for that subscription.
        alice.start()
        first = await with_timeout(alice.presence("room:1"))
        assert first["type"] == "presence" and first["channel"] == "room:1"
        assert (first["count"], first["users"]) == (1, 1)
        [me] = first["clients"]
        assert me["user"] == "alice" and me["info"] == {"name": "Alice"}

        await with_timeout(bob.ready())

        def bobs() -> list[dict[str, Any]]:  # (alice may hear of her own coming too)
            return [f for f in joins if f["member"]["user"] == "bob"]

        await wait_for(bobs, what="alice to hear bob join")
        bob_member = bobs()[0]["member"]
        assert all(f["type"] == "join" and f["channel"] == "room:1" for f in joins)
        assert bob_member["info"] is None
        assert bob_member["client"] != me["client"]

        # A user with two connections: two members, one user.
        await with_timeout(alice_again.ready())
        seen = await with_timeout(bob.presence("room:1"))
        assert (seen["count"], seen["users"]) == (3, 2)
        members = by_client(seen["clients"])
        assert members[me["client"]] == me
        assert members[bob_member["client"]] == bob_member
        assert sorted(m["user"] for m in seen["clients"]) == ["alice", "alice", "bob"]
        # Answers for one channel come in the order asked: several at once all settle.
        answers = [alice_again.presence("room:1") for _ in range(3)]
        for answer in answers:
            assert (await with_timeout(answer))["count"] == 3

        await with_timeout(bob.close())
        await wait_for(
            lambda: any(f["member"]["client"] == bob_member["client"] for f in leaves),
            what="alice to hear bob leave",
        )
        assert all(f["type"] == "leave" and f["channel"] == "room:1" for f in leaves)
        after = await with_timeout(alice.presence("room:1"))
        assert (after["count"], after["users"]) == (2, 1)
        assert bob_member["client"] not in by_client(after["clients"])

        # Refusals: a channel it is not subscribed to; a channel without presence.
        with pytest.raises(PushdError) as refused:
            await with_timeout(alice.presence("room:2"))
        assert (refused.value.status, refused.value.code) == (403, "forbidden")
        with pytest.raises(PushdError) as off:
            await with_timeout(alice_again.presence("lobby"))
        assert (off.value.status, off.value.code) == (404, "presence_off")
        # The connection still answers after its refusals.
        assert (await with_timeout(alice_again.presence("room:1")))["count"] == 2
    finally:
        for s in (alice, bob, alice_again):
            await with_timeout(s.close())

    # No connection: refused by the client itself, not left waiting.
    with pytest.raises(PushdError) as closed:
        await with_timeout(alice.presence("room:1"))
    assert (closed.value.status, closed.value.code) == (0, "not_connected")
    never_started = subscriber(node, "carol", "room:1")
    with pytest.raises(PushdError) as idle:
        await with_timeout(never_started.presence("room:1"))
    assert idle.value.code == "not_connected"


@pytest_twisted.ensureDeferred
async def test_a_reconnect_fails_what_waits_and_presence_works_again(node: Node) -> None:
    """A presence() in flight when the connection goes fails with connection_lost
    (the answer could come on no other connection); after the reconnect the new
    connection is the member (the old one left)."""
    joins: list[dict[str, Any]] = []
    leaves: list[dict[str, Any]] = []
    watcher = subscriber(node, "watcher", "room:3", on_join=joins.append, on_leave=leaves.append)
    mover = subscriber(node, "mover", "room:3", backoff=0.05, max_backoff=0.2)
    try:
        await with_timeout(watcher.ready())
        await with_timeout(mover.ready())
        before = await with_timeout(mover.presence("room:3"))
        [old] = [m for m in before["clients"] if m["user"] == "mover"]
        # pushd never announces a member that comes and goes within its 0.25 s window.
        await wait_for(
            lambda: {"type": "join", "channel": "room:3", "member": old} in joins,
            what="the watcher to hear the mover come",
        )

        protocol = mover._protocol
        assert protocol is not None
        asked = mover.presence("room:3")
        # Cut the TCP connection under it, as a network failure does.
        protocol.dropConnection(abort=True)
        with pytest.raises(PushdError) as lost:
            await with_timeout(asked)
        assert (lost.value.status, lost.value.code) == (0, "connection_lost")

        await wait_for(lambda: mover.connections == 2, what="the reconnect")
        await wait_for(
            lambda: any(f["member"]["client"] == old["client"] for f in leaves),
            what="the old connection to leave",
        )
        again = await with_timeout(mover.presence("room:3"))
        assert again["count"] == 2
        [new] = [m for m in again["clients"] if m["user"] == "mover"]
        assert new["client"] != old["client"]
    finally:
        await with_timeout(mover.close())
        await with_timeout(watcher.close())


@pytest_twisted.ensureDeferred
async def test_publisher_asks_presence_over_http(node: Node) -> None:
    member = subscriber(node, "dora", "room:4", info={"seat": 7})
    try:
        await with_timeout(member.ready())
        async with Publisher(node.url) as publisher:  # a loopback producer
            answer = await with_timeout(publisher.presence("room:4"))
            assert answer["channel"] == "room:4"
            assert (answer["count"], answer["users"]) == (1, 1)
            [dora] = answer["clients"]
            assert (dora["user"], dora["info"]) == ("dora", {"seat": 7})
            # The WebSocket's answer is the same member.
            assert (await with_timeout(member.presence("room:4")))["clients"] == [dora]

            empty = await with_timeout(publisher.presence("room:empty"))
            assert (empty["count"], empty["users"], empty["clients"]) == (0, 0, [])
            with pytest.raises(PushdError) as off:
                await with_timeout(publisher.presence("lobby"))
            assert (off.value.status, off.value.code) == (404, "presence_off")
    finally:
        await with_timeout(member.close())
