"""Server-side control: the application addresses users and channels on every node."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.sse import open_sse
from tests.support import (
    SECRET,
    Node,
    PushdUnderTest,
    RedisServer,
    StartPushd,
    WSClient,
    token,
    wait_for,
    with_timeout,
)


async def post(node: Any, path: str, body: Any = None, method: str = "POST") -> Any:
    response = await treq.request(
        method,
        f"{node.url}{path}",
        data=json.dumps(body).encode() if body is not None else b"",
        headers={"content-type": ["application/json"]},
        persistent=False,
    )
    return response.code, await response.json()


@pytest_twisted.async_yield_fixture
async def cluster(
    redis_server: RedisServer, tmp_path: Path, prefix: str
) -> AsyncIterator[Callable[[int], Any]]:
    nodes: list[Node] = []

    async def start(n: int) -> list[Node]:
        options = (
            "--redis", f"redis://127.0.0.1:{redis_server.port}", "--redis-prefix", prefix,
            "--token-secret", SECRET,
        )  # fmt: skip
        started = [Node(tmp_path, *options) for _ in range(n)]
        for node in started:
            node.start()
            await node.ready()
        nodes.extend(started)
        return started

    yield start  # type: ignore[misc]
    for node in nodes:
        node.stop()


async def user_on(node: Node, user: str, *channels: str) -> WSClient:
    query = "".join(f"&channel={c}" for c in channels)
    client = await node.connect(f"?token={token(user, ['*'])}{query}")
    joined = {(await client.next_of("subscribed"))["channel"] for _ in range(1 + len(channels))}
    assert joined == {f"user#{user}", *channels}
    return client


@pytest_twisted.ensureDeferred
async def test_commands_reach_every_connection_of_a_user_on_every_node(cluster: Any) -> None:
    a, b, c = await cluster(3)
    alice = [await user_on(a, "alice"), await user_on(b, "alice"), await user_on(c, "alice")]
    bob = await user_on(b, "bob")

    # A message to a user reaches all her devices, with history.
    code, body = await post(a, "/users/alice", "hi alice")
    assert code == 200 and body["channel"] == "user#alice"
    for client in alice:
        assert (await client.next_of("message"))["data"] == "hi alice"
    await bob.nothing_more()
    # ... and a device that was away recovers it.
    _, again = await post(b, "/users/alice", "again")
    for client in alice:
        await client.next_of("message")
    late = await c.connect(
        f"?token={token('alice', ['*'])}&channel=user%23alice&since={body['id']}"
    )
    assert (await late.next_of("subscribed"))["recovered"] is True
    assert (await late.next_of("message"))["id"] == again["id"]

    # Join and leave a group, on every node.
    assert await post(b, "/users/alice/subscribe", {"channel": "team"}) == (200, {"nodes": 3})
    for client in alice:
        assert (await client.next_of("subscribed"))["channel"] == "team"
    await a.publish("team", "standup")
    for client in alice:
        assert (await client.next_of("message"))["data"] == "standup"
    assert await post(c, "/users/alice/unsubscribe", {"channel": "team"}) == (200, {"nodes": 3})
    for client in alice:
        assert await client.next_of("unsubscribed") == {"type": "unsubscribed", "channel": "team"}
    await a.publish("team", "no one hears this")
    for client in alice:
        await client.nothing_more()

    # Disconnect: every connection of alice closes with 4003; bob stays.
    assert (await post(a, "/users/alice/disconnect"))[0] == 200
    for client in alice:
        _, close_code, _ = await client.closed
        assert close_code == 4003
    await bob.nothing_more()
    await late.close()
    await bob.close()


@pytest_twisted.ensureDeferred
async def test_destroying_a_channel_everywhere(cluster: Any) -> None:
    a, b = await cluster(2)
    ws = [await user_on(a, "u1", "room"), await user_on(b, "u2", "room")]
    sse = await open_sse(f"{b.url}/sse?channel=room&token={token(None, ['room'])}")
    await sse.next()
    old = await a.publish("room", "before")
    for client in ws:
        await client.next_of("message")
    await sse.next()

    code, body = await post(b, "/channels/room", method="DELETE")
    assert (code, body) == (200, {"nodes": 2})
    for client in ws:
        assert await client.next_of("unsubscribed") == {"type": "unsubscribed", "channel": "room"}
    await sse.ended  # the stream ends
    history = await (await treq.get(f"{a.url}/channels/room/history", persistent=False)).json()
    assert history == {"messages": []}

    # A fresh history: resuming from an old id is not a recovery.
    await a.publish("room", "after")
    again = await b.connect(f"?token={token(None, ['room'])}&channel=room&since={old}")
    assert (await again.next_of("subscribed"))["recovered"] is False
    assert (await again.next_of("message"))["data"] == "after"
    for client in [*ws, again]:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_sse_of_a_disconnected_user_ends(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(token_secret=SECRET)
    stream = await open_sse(f"{pushd.url}/sse?channel=x&token={token('carol', ['x'])}")
    events = [json.loads((await stream.next()).data)["channel"] for _ in range(2)]
    assert sorted(events) == ["user#carol", "x"]
    code, body = await post(pushd, "/users/carol/disconnect")
    assert (code, body) == (200, {"nodes": 1})
    await stream.ended


@pytest_twisted.ensureDeferred
async def test_bad_commands(start_pushd: StartPushd) -> None:
    pushd = await start_pushd()
    assert (await post(pushd, "/users/bad%20id", "x"))[1]["error"] == "bad_user"
    assert (await post(pushd, "/users/a/subscribe", {"channel": "bad name"}))[1]["error"] == (
        "bad_channel"
    )
    assert (await post(pushd, "/users/a/subscribe", {}))[1]["error"] == "bad_channel"
    assert (await post(pushd, "/users/a/nothing"))[0] == 404


def _assert_nothing_left(pushd: PushdUnderTest) -> None:
    """Every map a session is kept in is exactly empty: the hub's channels and
    users, the broker's subscriptions, the connection counts, the open connections."""
    service = pushd.service
    assert service is not None
    site: Any = service.site
    assert pushd.hub.channels() == {}
    assert pushd.hub.users() == {}
    assert service.broker.subscribed_channels() == frozenset()  # type: ignore[attr-defined]
    assert len(site.ws_factory.gate.connections) == 0
    assert site.ws_factory.clients == set()
    assert site.channels == set()


async def _all_gone(pushd: PushdUnderTest, timeout: float = 10) -> None:
    def gone() -> bool:
        try:
            _assert_nothing_left(pushd)
        except AssertionError:
            return False
        return True

    await wait_for(gone, timeout, what="the maps to empty")
    _assert_nothing_left(pushd)  # the first failure, in full, on a timeout


_KINDS = (
    "connect",
    "subscribe",
    "unsubscribe",
    "close",
    "abort",
    "join",
    "leave",
    "kick",
    "destroy",
)

# One step of a few users' sessions: (what, which connection, which user or channel).
_steps = st.lists(
    st.tuples(
        st.sampled_from(_KINDS),
        st.integers(0, 3),
        st.integers(0, 2),
    ),
    max_size=25,
)


async def _play(steps: list[tuple[str, int, int]], last: list[bool]) -> None:
    """Sessions of users u0-u2 on connections 0-3: frames are sent without waiting
    for their answers (each races what follows), connections closed or dropped
    at any moment, the application's commands (join, leave, kick, destroy) in between."""
    pushd = PushdUnderTest.config(token_secret=SECRET)
    await pushd.start()
    try:
        open_: dict[int, WSClient] = {}
        everyone: list[WSClient] = []
        for kind, slot, which in steps:
            client = open_.get(slot)
            if client is not None and client.state != client.STATE_OPEN:
                del open_[slot]  # closed by pushd (kick)
                client = None
            if kind == "connect" and client is None:
                query = f"?token={token(f'u{which}', ['*'])}&channel=c{which}"
                open_[slot] = client = await pushd.connect(query)
                everyone.append(client)
            elif kind in ("subscribe", "unsubscribe") and client is not None:
                client.send({"type": kind, "channel": f"c{which}"})
            elif kind == "close" and client is not None:
                client.sendClose(1000)
                del open_[slot]
            elif kind == "abort" and client is not None:
                client.transport.abortConnection()  # type: ignore[union-attr]
                del open_[slot]
            elif kind in ("join", "leave", "kick", "destroy"):
                cmd = {"join": "subscribe", "leave": "unsubscribe", "kick": "disconnect"}.get(
                    kind, kind
                )
                pushd.hub.control({"cmd": cmd, "user": f"u{slot % 3}", "channel": f"c{which}"})
        for n, client in enumerate(open_.values()):
            if last[n % len(last)]:
                client.sendClose(1000)
            else:
                client.transport.abortConnection()  # type: ignore[union-attr]
        for client in everyone:
            await with_timeout(client.closed)
        # Every client has seen its connection go: pushd is a few turns from clean,
        # so a leak fails fast (and hypothesis shrinks it in seconds, not minutes).
        await _all_gone(pushd, timeout=2)
    finally:
        await pushd.stop()


@settings(max_examples=60, deadline=None)
@given(steps=_steps, last=st.lists(st.booleans(), min_size=1, max_size=4))
@pytest_twisted.ensureDeferred
async def test_the_maps_are_clean_after_any_sessions_of_a_few_users(
    steps: list[tuple[str, int, int]], last: list[bool]
) -> None:
    await _play(steps, last)


@pytest_twisted.ensureDeferred
async def test_the_maps_are_clean_after_300_sessions_of_users() -> None:
    pushd = PushdUnderTest.config(token_secret=SECRET)
    await pushd.start()
    for round_ in range(3):
        clients = [
            await pushd.connect(f"?token={token(f'u{n % 37}', ['*'])}&channel=c{n % 5}")
            for n in range(round_ * 100, round_ * 100 + 100)
        ]
        for client in clients:
            for _ in range(2):
                await client.next_of("subscribed")
        for n, client in enumerate(clients):
            if n % 2:
                client.transport.abortConnection()
            else:
                await client.close()
    await _all_gone(pushd)
    await pushd.stop()
