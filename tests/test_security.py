"""Who gets in: tokens and their grants, user channels, the application's say
(--auth-url), origins; and the per-client limits."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.support import (
    SECRET,
    PushdUnderTest,
    StartPushd,
    connect_raw,
    connect_ws,
    token,
    wait_for,
)

HANDSHAKE = (
    "GET /ws{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
)


async def handshake_status(pushd: PushdUnderTest, query: str = "", extra: str = "") -> int:
    """The HTTP status a raw upgrade request gets."""
    raw = await connect_raw(pushd.port)
    raw.transport.write(HANDSHAKE.format(query=query, extra=extra).encode())
    head = await raw.until(b"\r\n\r\n")
    raw.transport.loseConnection()
    return int(head.split(b" ", 2)[1])


@pytest_twisted.ensureDeferred
async def test_without_a_secret_anonymous_may_subscribe_but_not_to_user_channels(
    pushd: PushdUnderTest,
) -> None:
    client = await pushd.connect("?channel=news")
    await client.next_of("subscribed")
    client.send({"type": "subscribe", "channel": "inbox#42"})
    error = await client.next_of("error")
    assert (error["code"], error["channel"]) == ("forbidden", "inbox#42")
    client.send({"type": "publish", "channel": "news", "data": 1})
    assert (await client.next_of("error"))["code"] == "forbidden"
    await client.close()


@pytest_twisted.ensureDeferred
async def test_token_grants_channels_with_wildcards(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(token_secret=SECRET)
    assert await handshake_status(pushd, "?channel=news") == 401  # a token is required
    t = token(None, channels=["news", "chat.*"])
    client = await pushd.connect(f"?channel=news&channel=chat.room1&token={t}")
    subscribed = {(await client.next_of("subscribed"))["channel"] for _ in range(2)}
    assert subscribed == {"news", "chat.room1"}
    for channel in ("sport", "chatroom", "news.extra"):
        client.send({"type": "subscribe", "channel": channel})
        error = await client.next_of("error")
        assert (error["code"], error["channel"]) == ("forbidden", channel)
    await pushd.publish("chat.room1", "hi")
    assert (await client.next_of("message"))["data"] == "hi"
    await client.close()


@pytest_twisted.ensureDeferred
async def test_bearer_header_carries_the_token(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(token_secret=SECRET)
    t = token("alice", channels=["*"])
    assert await handshake_status(pushd, "?channel=a", f"Authorization: Bearer {t}\r\n") == 101
    assert await handshake_status(pushd, "?channel=a", "Authorization: Bearer nope\r\n") == 401


@pytest_twisted.ensureDeferred
async def test_user_channels_admit_only_listed_subjects(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(token_secret=SECRET)
    alice = await pushd.connect(f"?token={token('alice', channels=[])}")
    carol = await pushd.connect(f"?token={token('carol', channels=['*', 'dm#*'])}")
    assert (await alice.next_of("subscribed"))["channel"] == "user#alice"  # personal
    assert (await carol.next_of("subscribed"))["channel"] == "user#carol"
    alice.send({"type": "subscribe", "channel": "dm#alice,bob"})
    assert (await alice.next_of("subscribed"))["channel"] == "dm#alice,bob"
    carol.send({"type": "subscribe", "channel": "dm#alice,bob"})
    assert (await carol.next_of("error"))["code"] == "forbidden"
    await pushd.publish("dm#alice,bob", "psst")
    assert (await alice.next_of("message"))["data"] == "psst"
    await carol.nothing_more()
    await alice.close()
    await carol.close()


@pytest_twisted.ensureDeferred
async def test_client_publish_with_a_grant(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(token_secret=SECRET, max_message_size=1000)
    writer = await pushd.connect(
        f"?channel=chat.1&token={token(None, channels=['chat.*'], publish=['chat.*'])}"
    )
    reader = await pushd.connect(f"?channel=chat.1&token={token(None, channels=['chat.*'])}")
    await writer.next_of("subscribed")
    await reader.next_of("subscribed")
    writer.send({"type": "publish", "channel": "chat.1", "data": {"text": "hello"}})
    for client in (writer, reader):  # the sender receives it too
        frame = await client.next_of("message")
        assert (frame["channel"], frame["data"]) == ("chat.1", {"text": "hello"})
    history = await pushd.service.broker.history("chat.1", None, 10)
    assert [data for _, data in history.messages] == [b'{"text":"hello"}']

    reader.send({"type": "publish", "channel": "chat.1", "data": 1})
    assert (await reader.next_of("error"))["code"] == "forbidden"
    writer.send({"type": "publish", "channel": "chat.1", "data": "x" * 1010})
    assert (await writer.next_of("error"))["code"] == "too_large"
    writer.send({"type": "publish", "channel": "news", "data": 1})
    assert (await writer.next_of("error"))["code"] == "forbidden"
    await reader.nothing_more()
    await writer.close()
    await reader.close()


@pytest_twisted.ensureDeferred
async def test_publish_rate_is_a_token_bucket(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(token_secret=SECRET, publish_rate=0.001, publish_burst=3)
    t = token(None, channels=["*"], publish=["*"])
    client = await pushd.connect(f"?channel=c&token={t}")
    await client.next_of("subscribed")
    for n in range(5):
        client.send({"type": "publish", "channel": "c", "data": n})
    got = [await client.next() for _ in range(5)]
    assert [f["data"] for f in got if f["type"] == "message"] == [0, 1, 2]
    assert [f["code"] for f in got if f["type"] == "error"] == ["rate_limited"] * 2
    await client.close()


@pytest_twisted.ensureDeferred
async def test_an_expired_token_ends_the_connection_with_4001(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(token_secret=SECRET)
    assert await handshake_status(pushd, f"?token={token('a', channels=['*'], ttl=-5)}") == 401
    client = await pushd.connect(f"?channel=c&token={token('a', channels=['*'], ttl=1.2)}")
    await client.next_of("subscribed")
    _, code, _ = await client.closed
    assert code == 4001
    await wait_for(lambda: pushd.hub.channels() == {}, what="the hub to let go")


@pytest_twisted.ensureDeferred
async def test_allowed_origins(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(allowed_origin=("https://example.com", "https://*.example.org"))
    assert await handshake_status(pushd, "", "Origin: https://example.com\r\n") == 101
    assert await handshake_status(pushd, "", "Origin: https://app.example.org\r\n") == 101
    assert await handshake_status(pushd, "", "Origin: https://evil.example\r\n") == 403
    assert await handshake_status(pushd, "", "Origin: https://example.com.evil\r\n") == 403
    assert await handshake_status(pushd) == 101  # not a browser page


@pytest_twisted.ensureDeferred
async def test_connections_per_address_are_capped(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(max_connections_per_ip=3)
    counter = pushd.service.listeners[0].factory.ws_factory.gate.connections
    clients = [await pushd.connect() for _ in range(3)]
    assert await handshake_status(pushd) == 429
    await clients[0].close()
    await wait_for(lambda: counter.count("127.0.0.1") == 2, what="the server to count the close")
    again = await pushd.connect()
    for client in [*clients[1:], again]:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_subscriptions_per_connection_are_capped(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(max_subscriptions=2)
    client = await pushd.connect("?channel=a&channel=b&channel=c")
    frames = [await client.next() for _ in range(3)]
    assert sorted(f["type"] for f in frames) == ["error", "subscribed", "subscribed"]
    assert next(f for f in frames if f["type"] == "error")["code"] == "too_many_subscriptions"
    client.send({"type": "unsubscribe", "channel": "a"})
    await client.next_of("unsubscribed")
    client.send({"type": "subscribe", "channel": "c"})
    assert (await client.next_of("subscribed"))["channel"] == "c"
    await client.close()


class Backend(Resource):
    """The application behind --auth-url: answers by the session cookie."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[dict[str, Any]] = []

    def render_POST(self, request: Any) -> Any:
        body = json.loads(request.content.read())
        self.asked.append(body)
        session = body["cookies"].get("session")
        if session == "alice":
            return json.dumps({"sub": "alice", "channels": ["news"], "publish": ["news"]}).encode()
        if session == "huge":
            return b'{"sub": "' + b"x" * 100_000 + b'"}'
        if session == "slow":
            return NOT_DONE_YET
        if session == "broken":
            return b"not json"
        request.setResponseCode(403)
        return b"{}"


@pytest.fixture
def backend() -> Any:
    resource = Backend()
    port = pytest_twisted.blockon(
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(resource))
    )
    yield resource, f"http://127.0.0.1:{port.getHost().port}/auth"
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest_twisted.ensureDeferred
async def test_auth_url_asks_the_application(start_pushd: StartPushd, backend: Any) -> None:
    resource, url = backend
    pushd = await start_pushd(auth_url=url, auth_timeout=0.5)

    def cookie(value: str) -> str:
        return f"Cookie: session={value}; theme=dark\r\nUser-Agent: tests\r\n"

    assert await handshake_status(pushd, "?channel=news", cookie("alice")) == 101
    asked = resource.asked[-1]
    assert asked["channels"] == ["news"] and asked["transport"] == "websocket"
    assert asked["cookies"] == {"session": "alice", "theme": "dark"}
    assert asked["headers"]["user-agent"] == "tests"
    for refused in ("mallory", "huge", "slow", "broken"):
        assert await handshake_status(pushd, "?channel=news", cookie(refused)) == 403, refused

    # The grants act like a token's.
    factory_headers = {"Cookie": "session=alice"}
    client = await connect_ws(pushd.port, "/ws?channel=news", headers=factory_headers)
    # The application said the client is alice: news, and her personal channel.
    joined = {(await client.next_of("subscribed"))["channel"] for _ in range(2)}
    assert joined == {"news", "user#alice"}
    client.send({"type": "subscribe", "channel": "sport"})
    assert (await client.next_of("error"))["code"] == "forbidden"
    client.send({"type": "publish", "channel": "news", "data": "from alice"})
    assert (await client.next_of("message"))["data"] == "from alice"
    await client.close()


@pytest_twisted.ensureDeferred
async def test_behind_a_trusted_proxy_the_forwarded_address_counts(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(trusted_proxies=1, max_connections_per_ip=1)
    # A producer the proxy saw at a public address is not on loopback.
    far = {"x-forwarded-for": ["198.51.100.1, 203.0.113.9"]}
    response = await pushd.post("news", "x", headers=far)
    assert (response.code, (await response.json())["error"]) == (403, "forbidden")
    near = {"x-forwarded-for": ["203.0.113.9, 127.0.0.1"]}
    assert (await pushd.post("news", "x", headers=near)).code == 200
    # Limits count each forwarded address on its own.
    xff = "X-Forwarded-For: {}\r\n"
    assert await handshake_status(pushd, "", xff.format("203.0.113.1")) == 101
    assert await handshake_status(pushd, "", xff.format("203.0.113.2")) == 101


@pytest_twisted.ensureDeferred
async def test_without_trusted_proxies_the_header_is_ignored(pushd: PushdUnderTest) -> None:
    spoofed = {"x-forwarded-for": ["203.0.113.9"]}
    assert (await pushd.post("news", "x", headers=spoofed)).code == 200
