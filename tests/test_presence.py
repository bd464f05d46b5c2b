"""Presence (shared/protocol.md, "Presence") on each broker: members listed by
`GET /channels/{c}/presence` and the `presence` frame, join and leave events on
every transport, and what a stranger may put on the bus or in Redis."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
import treq

from tests.support import (
    SECRET,
    StartPushd,
    connect_raw,
    token,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("broker_kind")


async def _presence(server: Any, channel: str) -> tuple[int, Any]:
    response = await treq.get(f"{server.url}/channels/{channel}/presence", persistent=False)
    return response.code, await response.json()


async def _frame(client: Any, kind: str, channel: str = "", user: str = "") -> dict[str, Any]:
    """The next frame of type `kind` (of `channel`; of a member of `user`),
    passing over the others (a token's personal channel, other members)."""
    while True:
        frame = await client.next()
        if frame["type"] != kind or (channel and frame.get("channel") != channel):
            continue
        if user and frame["member"]["user"] != user:
            continue
        return dict(frame)


def _members(body: dict[str, Any]) -> list[tuple[Any, Any]]:
    return sorted(((m["user"], json.dumps(m["info"])) for m in body["clients"]), key=str)


@pytest_twisted.ensureDeferred
async def test_members_of_every_connection_with_user_and_info(start_pushd: StartPushd) -> None:
    server = await start_pushd(presence=("room:*",), token_secret=SECRET)
    alice = await server.connect(
        f"?channel=room:1&token={token('alice', ['*'], info={'name': 'Alice'})}"
    )
    bob = [await server.connect(f"?channel=room:1&token={token('bob', ['*'])}") for _ in range(2)]
    for client in (alice, *bob):
        await _frame(client, "subscribed", "room:1")

    # Stored before `subscribed`: no wait needed.
    code, body = await _presence(server, "room:1")
    assert code == 200, body
    assert (body["channel"], body["count"], body["users"]) == ("room:1", 3, 2)
    assert _members(body) == [
        ("alice", '{"name": "Alice"}'),
        ("bob", "null"),
        ("bob", "null"),
    ]
    clients = [m["client"] for m in body["clients"]]
    assert len(set(clients)) == 3

    # The same answer as a frame, for a subscriber of the channel.
    alice.send({"type": "presence", "channel": "room:1"})
    frame = await _frame(alice, "presence")
    assert {k: frame[k] for k in ("channel", "count", "users")} == {
        "channel": "room:1",
        "count": 3,
        "users": 2,
    }
    assert _members(frame) == _members(body)

    await bob[0].close()
    await wait_for(lambda: server.hub.count("room:1") == 2)
    code, body = await _presence(server, "room:1")
    assert (body["count"], body["users"]) == (2, 2)
    alice.send({"type": "unsubscribe", "channel": "room:1"})
    await _frame(alice, "unsubscribed", "room:1")
    code, body = await _presence(server, "room:1")
    assert (body["count"], body["users"], _members(body)) == (1, 1, [("bob", "null")])
    await alice.close()
    await bob[1].close()


@pytest_twisted.ensureDeferred
async def test_anonymous_members_and_the_list_cap(start_pushd: StartPushd) -> None:
    server = await start_pushd(presence=("lobby",), max_presence_list=3)
    clients = [await server.connect("?channel=lobby") for _ in range(5)]
    for client in clients:
        await client.next_of("subscribed")
    code, body = await _presence(server, "lobby")
    assert (code, body["count"], body["users"], len(body["clients"])) == (200, 5, 0, 3)
    assert all(m["user"] is None and m["info"] is None for m in body["clients"])
    for client in clients:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_channels_without_presence_and_strangers(start_pushd: StartPushd) -> None:
    server = await start_pushd(presence=("room:*",))
    code, body = await _presence(server, "news")
    assert (code, body["error"]) == (404, "presence_off")
    code, body = await _presence(server, "bad%20name")
    assert (code, body["error"]) == (400, "bad_channel")
    code, body = await _presence(server, "room:empty")
    assert (code, body) == (200, {"channel": "room:empty", "count": 0, "users": 0, "clients": []})

    client = await server.connect("?channel=news")
    await client.next_of("subscribed")
    client.send({"type": "presence", "channel": "news"})
    assert (await client.next_of("error"))["code"] == "presence_off"
    # Not subscribed: nothing of the channel is told.
    client.send({"type": "presence", "channel": "room:1"})
    error = await client.next_of("error")
    assert (error["code"], error["channel"]) == ("forbidden", "room:1")
    client.send({"type": "presence"})
    assert (await client.next_of("error"))["code"] == "bad_channel"
    await client.close()


@pytest_twisted.ensureDeferred
async def test_presence_needs_the_producer_key(start_pushd: StartPushd) -> None:
    server = await start_pushd(presence=("room:*",), api_key=("k",))
    code, body = await _presence(server, "room:1")
    assert (code, body["error"]) == (401, "unauthorized")
    response = await treq.get(
        f"{server.url}/channels/room:1/presence",
        headers={"authorization": "Bearer k"},
        persistent=False,
    )
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_join_and_leave_on_every_transport(start_pushd: StartPushd) -> None:
    server = await start_pushd(join_leave=("room:*",), token_secret=SECRET)
    watcher = await server.connect(f"?channel=room:1&token={token('w', ['*'])}")
    await _frame(watcher, "subscribed", "room:1")
    sse = await connect_raw(server.port)
    sse.transport.write(
        f"GET /sse?channel=room:1&token={token('s', ['*'])} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    await sse.until(b"event: subscribed\nid:")
    ndjson = await connect_raw(server.port)
    ndjson.transport.write(
        f"GET /stream?channel=room:1&token={token('n', ['*'])} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    await ndjson.until(b'"type":"subscribed"')

    newcomer = await server.connect(
        f"?channel=room:1&token={token('carol', ['*'], info={'seat': 3})}"
    )
    await _frame(newcomer, "subscribed", "room:1")
    joined = await _frame(watcher, "join", user="carol")
    assert joined["channel"] == "room:1"
    assert joined["member"]["info"] == {"seat": 3}
    assert set(joined["member"]) == {"client", "user", "info"}
    client_id = joined["member"]["client"]
    await sse.until(b'event: join\ndata: {"type":"join","channel":"room:1","member":{"client":"')
    assert f'"client":"{client_id}","user":"carol"'.encode() in sse.data
    await ndjson.until(f'"client":"{client_id}"'.encode())

    await newcomer.close()
    frame = await _frame(watcher, "leave", user="carol")
    assert frame["member"] == joined["member"]
    await sse.until(b"event: leave\ndata: ")
    await ndjson.until(b'{"type":"leave"')
    for raw in (sse, ndjson):
        raw.transport.loseConnection()
    await watcher.close()


@pytest_twisted.ensureDeferred
async def test_no_events_without_join_leave(start_pushd: StartPushd) -> None:
    server = await start_pushd(presence=("room:*",))
    watcher = await server.connect("?channel=room:1")
    await watcher.next_of("subscribed")
    other = await server.connect("?channel=room:1")
    await other.next_of("subscribed")
    await other.close()
    await wait_for(lambda: server.hub.count("room:1") == 1)
    # Past a join-leave window: nothing but the pong.
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    await deferLater(reactor, 0.4, lambda: None)
    await watcher.nothing_more()
    await watcher.close()


@pytest_twisted.ensureDeferred
async def test_a_thousand_members(start_pushd: StartPushd) -> None:
    server = await start_pushd(presence=("big",), max_presence_list=1000)
    streams = []
    for _ in range(10):
        batch = [await connect_raw(server.port) for _ in range(100)]
        for raw in batch:
            raw.transport.write(b"GET /stream?channel=big HTTP/1.1\r\nHost: x\r\n\r\n")
        for raw in batch:
            await raw.until(b'"type":"subscribed"')
        streams += batch
    code, body = await _presence(server, "big")
    assert (code, body["count"], len(body["clients"])) == (200, 1000, 1000)
    assert len({m["client"] for m in body["clients"]}) == 1000
    for raw in streams[:500]:
        raw.transport.loseConnection()
    await wait_for(lambda: server.hub.count("big") == 500)
    code, body = await _presence(server, "big")
    assert body["count"] == 500
    for raw in streams[500:]:
        raw.transport.loseConnection()
    await wait_for(lambda: server.hub.count("big") == 0)
    code, body = await _presence(server, "big")
    assert body["count"] == 0


@pytest_twisted.ensureDeferred
async def test_presence_gauges(start_pushd: StartPushd) -> None:
    server = await start_pushd(join_leave=("room:*",))
    clients = [await server.connect("?channel=room:1") for _ in range(3)]
    for client in clients:
        await client.next_of("subscribed")
    response = await treq.get(f"{server.url}/metrics", persistent=False)
    text = (await response.content()).decode()
    assert "pushd_presence_members 3.0" in text
    assert "pushd_presence_events_waiting" in text
    for client in clients:
        await client.close()


@pytest.mark.parametrize("option", ["presence", "join_leave"])
@pytest_twisted.ensureDeferred
async def test_a_member_that_leaves_and_comes_back_at_once_is_counted(
    start_pushd: StartPushd, option: str
) -> None:
    """Unsubscribe and subscribe again in one read: the leave and the join
    reach the broker in one write, and the member stays (Redis ran the
    write's HSETs before its HDELs: the member was deleted though present).
    With join/leave, the leave's tombstone goes with the join, not with the
    member when the leave is said."""
    server = await start_pushd(**{option: ("room:*",)})
    # Another member keeps the channel subscribed at the bus: the join then
    # comes in the same reactor turn as the leave.
    stays = await server.connect("?channel=room:1")
    await stays.next_of("subscribed")
    client = await server.connect("?channel=room:1")
    await client.next_of("subscribed")
    for _ in range(3):
        client.sendMessage(b'{"type":"unsubscribe","channel":"room:1"}')
        client.sendMessage(b'{"type":"subscribe","channel":"room:1"}')
        await _frame(client, "unsubscribed", "room:1")
        await _frame(client, "subscribed", "room:1")
        code, body = await _presence(server, "room:1")
        assert (code, body["count"]) == (200, 2), body
    await client.close()
    await stays.close()
