"""The admin console's JSON API (/admin/api/*): auth, CSRF, the actions on
every broker, and the view of all nodes through Redis."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet.task import Clock

from pushd.admin.auth import MAX_AGE, AdminAuth
from tests.support import (
    SECRET,
    Node,
    PushdUnderTest,
    RedisServer,
    StartPushd,
    token,
    wait_for,
    with_timeout,
)

PASSWORD = "correct horse battery staple"
KEY = "admin-key-of-the-tests"
ACTION = {"x-pushd-admin": "1"}


async def call(
    server: Any,
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    cookie: str | None = None,
    bearer: str | None = None,
) -> tuple[int, Any, Any]:
    """(status, headers, parsed JSON body or None) of one request to `server`."""
    sent = {k: [v] for k, v in (headers or {}).items()}
    if body is not None:
        sent["content-type"] = ["application/json"]
    if cookie is not None:
        sent["cookie"] = [f"pushd_admin={cookie}"]
    if bearer is not None:
        sent["authorization"] = [f"Bearer {bearer}"]
    response = await treq.request(
        method,
        f"{server.url}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        headers=sent,
        persistent=False,
    )
    raw = await response.content()
    return response.code, response.headers, json.loads(raw) if raw else None


async def login(server: Any, password: str = PASSWORD) -> str:
    """Log in; the cookie's value."""
    code, headers, _ = await call(
        server, "POST", "/admin/api/login", {"password": password}, headers=ACTION
    )
    assert code == 204
    [set_cookie] = headers.getRawHeaders("set-cookie")
    return set_cookie.split(";")[0].split("=", 1)[1]


@pytest_twisted.async_yield_fixture
async def admin() -> AsyncIterator[PushdUnderTest]:
    """pushd on the memory broker with the admin console on."""
    server = PushdUnderTest.config(admin_password=PASSWORD, admin_key=(KEY,))
    await server.start()
    yield server
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_off_without_a_password_or_key() -> None:
    server = PushdUnderTest.config()
    await server.start()
    try:
        for method, path in [
            ("GET", "/admin"),
            ("GET", "/admin/"),
            ("GET", "/admin/api/nodes"),
            ("POST", "/admin/api/login"),
        ]:
            code, _, body = await call(server, method, path, headers=ACTION)
            assert (code, body["error"]) == (404, "not_found"), path
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_the_page_and_its_files(admin: PushdUnderTest) -> None:
    response = await treq.get(f"{admin.url}/admin", persistent=False, allow_redirects=False)
    await response.content()
    assert response.code == 302
    assert response.headers.getRawHeaders("location") == ["/admin/"]
    for path, kind in [
        ("/admin/", "text/html"),
        ("/admin/admin.js", "text/javascript"),
        ("/admin/admin.css", "text/css"),
    ]:
        response = await treq.get(f"{admin.url}{path}", persistent=False)
        assert len(await response.content()) > 500
        assert response.code == 200
        assert response.headers.getRawHeaders("content-type")[0].startswith(kind)
        assert response.headers.getRawHeaders("x-frame-options") == ["DENY"]
        assert (
            "frame-ancestors 'none'" in response.headers.getRawHeaders("content-security-policy")[0]
        )
    code, _, _ = await call(admin, "GET", "/admin/nothing")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_login_cookie_and_logout(admin: PushdUnderTest) -> None:
    code, _, body = await call(admin, "GET", "/admin/api/nodes")
    assert (code, body["error"]) == (401, "unauthorized")
    assert (await call(admin, "GET", "/admin/api/session"))[2] == {"authenticated": False}

    code, headers, body = await call(
        admin, "POST", "/admin/api/login", {"password": PASSWORD}, headers=ACTION
    )
    assert code == 204 and body is None
    assert headers.getRawHeaders("content-length") is None
    [set_cookie] = headers.getRawHeaders("set-cookie")
    value = set_cookie.split(";")[0].split("=", 1)[1]
    attributes = {a.strip() for a in set_cookie.split(";")[1:]}
    assert attributes == {"HttpOnly", "SameSite=Strict", "Path=/admin", f"Max-Age={MAX_AGE}"}
    expiry = int(value.split(".")[0])
    assert abs(expiry - (time.time() + MAX_AGE)) < 60

    code, headers, view = await call(admin, "GET", "/admin/api/nodes", cookie=value)
    assert code == 200 and headers.getRawHeaders("cache-control") == ["no-store"]
    assert view["totals"]["nodes"] == 1
    assert (await call(admin, "GET", "/admin/api/session", cookie=value))[2] == {
        "authenticated": True
    }

    code, headers, _ = await call(admin, "POST", "/admin/api/logout", cookie=value, headers=ACTION)
    assert code == 204
    [cleared] = headers.getRawHeaders("set-cookie")
    assert cleared.startswith("pushd_admin=;") and "Max-Age=0" in cleared


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_is_refused(admin: PushdUnderTest) -> None:
    for password in ["wrong", PASSWORD + "x", "", 42]:
        code, headers, body = await call(
            admin, "POST", "/admin/api/login", {"password": password}, headers=ACTION
        )
        assert (code, body["error"]) == (401, "unauthorized"), password
        assert headers.getRawHeaders("set-cookie") is None
    # An admin key also logs in.
    assert await login(admin, KEY)


@pytest_twisted.ensureDeferred
async def test_login_attempts_are_rate_limited(admin: PushdUnderTest) -> None:
    codes = []
    while 429 not in codes and len(codes) < 10:
        code, headers, body = await call(
            admin, "POST", "/admin/api/login", {"password": "guess"}, headers=ACTION
        )
        codes.append(code)
    # 5 at once, then one every 2 s: a slow machine may get one more in.
    assert codes[:5] == [401] * 5 and codes[-1] == 429 and len(codes) <= 7, codes
    assert body["error"] == "rate_limited" and headers.getRawHeaders("retry-after")
    # Even the right password waits.
    code, _, _ = await call(
        admin, "POST", "/admin/api/login", {"password": PASSWORD}, headers=ACTION
    )
    assert code == 429


@pytest_twisted.ensureDeferred
async def test_tampered_and_expired_cookies_are_refused(admin: PushdUnderTest) -> None:
    good = await login(admin)
    expiry, mac = good.split(".")
    flipped = mac[:-1] + ("0" if mac[-1] != "0" else "1")
    later = str(int(expiry) + 1000)
    # Signed with another password; an expiry pushed later; a MAC of another expiry.
    other = AdminAuth("another password", (), Clock()).make_cookie().decode()
    expired_clock = Clock()
    expired_clock.advance(time.time() - MAX_AGE - 5)
    expired = AdminAuth(PASSWORD, (KEY,), expired_clock).make_cookie().decode()
    for bad in [f"{expiry}.{flipped}", f"{later}.{mac}", other, expired, "", "x", good + "0"]:
        code, _, body = await call(admin, "GET", "/admin/api/nodes", cookie=bad)
        assert (code, body["error"]) == (401, "unauthorized"), bad
    # The same crafting with the right password and a live expiry is accepted:
    # what made `expired` fail is its expiry alone.
    live_clock = Clock()
    live_clock.advance(time.time())
    live = AdminAuth(PASSWORD, (KEY,), live_clock).make_cookie().decode()
    assert (await call(admin, "GET", "/admin/api/nodes", cookie=live))[0] == 200


def test_a_cookie_expires_after_max_age() -> None:
    clock = Clock()
    clock.advance(1_800_000_000)
    auth = AdminAuth(PASSWORD, (), clock)
    cookie = auth.make_cookie()
    assert auth.cookie_ok(cookie)
    clock.advance(MAX_AGE - 1)
    assert auth.cookie_ok(cookie)
    clock.advance(1)
    assert not auth.cookie_ok(cookie)
    # Every node with the same password accepts it; another password does not.
    assert AdminAuth(PASSWORD, ("k",), Clock()).cookie_ok(
        AdminAuth(PASSWORD, (), Clock()).make_cookie()
    )
    assert not AdminAuth("other", (), Clock()).cookie_ok(
        AdminAuth(PASSWORD, (), Clock()).make_cookie()
    )


@pytest_twisted.ensureDeferred
async def test_an_admin_key_as_bearer(admin: PushdUnderTest) -> None:
    code, _, view = await call(admin, "GET", "/admin/api/nodes", bearer=KEY)
    assert code == 200 and view["nodes"][0]["version"]
    code, _, body = await call(admin, "GET", "/admin/api/nodes", bearer=KEY + "x")
    assert (code, body["error"]) == (401, "unauthorized")
    # A key is no browser's ambient credential: actions need no CSRF header.
    code, _, body = await call(admin, "POST", "/admin/api/users/nobody/disconnect", bearer=KEY)
    assert (code, body) == (200, {"nodes": 1})


@pytest_twisted.ensureDeferred
async def test_actions_with_the_cookie_are_csrf_checked(admin: PushdUnderTest) -> None:
    cookie = await login(admin)
    path = "/admin/api/users/nobody/disconnect"
    code, _, body = await call(admin, "POST", path, cookie=cookie)
    assert (code, body["error"]) == (403, "forbidden")
    for origin in ["http://evil.example", f"http://127.0.0.1:{admin.port + 1}", "null"]:
        code, _, body = await call(
            admin, "POST", path, cookie=cookie, headers={**ACTION, "origin": origin}
        )
        assert (code, body["error"]) == (403, "forbidden"), origin
    code, _, body = await call(
        admin, "DELETE", "/admin/api/channels/c", cookie=cookie, headers={"origin": admin.url}
    )
    assert code == 403
    code, _, body = await call(
        admin, "POST", path, cookie=cookie, headers={**ACTION, "origin": admin.url}
    )
    assert (code, body) == (200, {"nodes": 1})
    code, _, body = await call(admin, "POST", path, cookie=cookie, headers=ACTION)
    assert (code, body) == (200, {"nodes": 1})
    # Login from another origin is refused too.
    code, _, _ = await call(
        admin,
        "POST",
        "/admin/api/login",
        {"password": PASSWORD},
        headers={**ACTION, "origin": "http://evil.example"},
    )
    assert code == 403


@pytest_twisted.ensureDeferred
async def test_bad_requests(admin: PushdUnderTest) -> None:
    h = {"bearer": KEY}
    cases = [
        ("GET", "/admin/api/channels/bad%20name", None, 400, "bad_channel"),
        ("POST", "/admin/api/channels/ok/publish", {"nodata": 1}, 400, "bad_body"),
        ("POST", "/admin/api/channels/ok/publish", [1], 400, "bad_body"),
        ("POST", "/admin/api/users/bad%01user/disconnect", None, 400, "bad_user"),
        ("POST", "/admin/api/users/u/unsubscribe", {"channel": "a b"}, 400, "bad_channel"),
        ("GET", "/admin/api/users/u/disconnect", None, 405, "method_not_allowed"),
        ("GET", "/admin/api/nothing", None, 404, "not_found"),
        ("GET", "/admin/api/channels/a/b/c", None, 404, "not_found"),
    ]
    for method, path, body, status, error in cases:
        code, _, answer = await call(admin, method, path, body, **h)
        assert (code, answer["error"]) == (status, error), path


@pytest_twisted.ensureDeferred
async def test_each_action_on_every_broker(start_pushd: StartPushd) -> None:
    server = await start_pushd(admin_password=PASSWORD, token_secret=SECRET, presence=("room*",))
    cookie = await login(server)

    async def act(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        code, _, answer = await call(server, method, path, body, cookie=cookie, headers=ACTION)
        return code, answer

    alice = await server.connect(f"?channel=room-1&token={token('alice', ['*'])}")
    bob = await server.connect(f"?channel=room-1&token={token('bob', ['*'])}")
    for client in (alice, bob):
        channels = {(await client.next_of("subscribed"))["channel"] for _ in range(2)}
        assert "room-1" in channels

    # Publish: the producer API's answer; the subscribers get it.
    code, answer = await act("POST", "/admin/api/channels/room-1/publish", {"data": {"n": 1}})
    assert code == 200 and answer["channel"] == "room-1"
    for client in (alice, bob):
        message = await client.next_of("message")
        assert (message["id"], message["data"]) == (answer["id"], {"n": 1})

    # The channel: last id, subscribers on all nodes, last messages, presence.
    async def info() -> Any:
        code, answer = await act("GET", "/admin/api/channels/room-1")
        assert code == 200
        return answer

    await wait_for(lambda: _subscribers(info(), 2), what="2 subscribers counted")
    seen = await info()
    assert seen["last_id"] == answer["id"]
    assert seen["messages"] == [
        {"type": "message", "channel": "room-1", "id": answer["id"], "data": {"n": 1}}
    ]
    assert seen["presence"]["count"] == 2 and seen["presence"]["users"] == 2
    assert {c["user"] for c in seen["presence"]["clients"]} == {"alice", "bob"}
    code, other = await act("GET", "/admin/api/channels/elsewhere")
    assert other["presence"] is None and other["last_id"] is None

    # Unsubscribe bob from the channel.
    code, answer = await act("POST", "/admin/api/users/bob/unsubscribe", {"channel": "room-1"})
    assert (code, answer) == (200, {"nodes": 1})
    assert (await bob.next_of("unsubscribed"))["channel"] == "room-1"

    # Disconnect alice: 4003.
    code, answer = await act("POST", "/admin/api/users/alice/disconnect")
    assert (code, answer) == (200, {"nodes": 1})
    _, close_code, _ = await with_timeout(alice.closed)
    assert close_code == 4003

    # Delete the channel: its subscribers leave, its history goes.
    carol = await server.connect(f"?channel=room-1&token={token('carol', ['*'])}")
    await carol.next_of("subscribed")
    await carol.next_of("subscribed")
    code, answer = await act("DELETE", "/admin/api/channels/room-1")
    assert (code, answer) == (200, {"nodes": 1})
    assert (await carol.next_of("unsubscribed"))["channel"] == "room-1"
    assert (await info())["messages"] == []
    await bob.close()
    await carol.close()


async def _subscribers(answer: Any, n: int) -> bool:
    return (await answer)["subscribers"] == n


@pytest_twisted.ensureDeferred
async def test_the_view_counts_connections_and_busy_channels(start_pushd: StartPushd) -> None:
    server = await start_pushd(admin_key=(KEY,))

    async def view() -> Any:
        return (await call(server, "GET", "/admin/api/nodes", bearer=KEY))[2]

    clients = [await server.connect("?channel=busy") for _ in range(3)]
    quiet = await server.connect("?channel=quiet")
    for client in (*clients, quiet):
        await client.next_of("subscribed")
    for n in range(5):
        await server.publish("busy", n)

    async def shows() -> bool:
        v = await view()
        return (
            v["totals"]["connections"] == 4
            and v["top_subscribers"][:2]
            == [{"channel": "busy", "subscribers": 3}, {"channel": "quiet", "subscribers": 1}]
            and v["totals"]["subscriptions"] == 4
        )

    await wait_for(shows, what="4 connections and busy first")
    v = await view()
    [node] = v["nodes"]
    assert node["addresses"] == [f"127.0.0.1:{server.port}"]
    assert node["transports"] == {"websocket": 4}
    assert node["published"] >= 5 and node["deliveries"] >= 15
    assert len(node["redis"]) == len(server.cfg.redis)
    assert all(shard["up"] for shard in node["redis"])

    # The messages of a channel per second: they show up, then fall back to none.
    async def fast() -> bool:
        await server.publish("busy", "more")
        return any(e["channel"] == "busy" for e in (await view())["top_rates"])

    await wait_for(fast, what="busy among the fastest channels")
    for client in (*clients, quiet):
        await client.close()
    await wait_for(lambda: _totals(view(), 0), what="no connection left in the view")


async def _totals(answer: Any, connections: int) -> bool:
    return (await answer)["totals"]["connections"] == connections


@pytest_twisted.ensureDeferred
async def test_events_stream_the_view(admin: PushdUnderTest) -> None:
    from tests.support import connect_raw

    cookie = await login(admin)
    raw = await connect_raw(admin.port)
    raw.transport.write(
        b"GET /admin/api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Cookie: pushd_admin=" + cookie.encode() + b"\r\n\r\n"
    )
    data = await raw.until(b"event: stats", count=2)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"content-type: text/event-stream" in head.lower()
    event = body.split(b"event: stats\ndata: ", 1)[1].split(b"\n", 1)[0]
    assert json.loads(event)["totals"]["nodes"] == 1
    raw.transport.loseConnection()

    code, _, body = await call(admin, "GET", "/admin/api/events")
    assert (code, body["error"]) == (401, "unauthorized")


@pytest_twisted.async_yield_fixture
async def two_nodes(
    redis_server: RedisServer, tmp_path: Path, prefix: str
) -> AsyncIterator[list[Node]]:
    options = (
        "--redis", f"redis://127.0.0.1:{redis_server.port}", "--redis-prefix", prefix,
        "--admin-key", KEY,
    )  # fmt: skip
    nodes = [Node(tmp_path, *options) for _ in range(2)]
    for node in nodes:
        node.start()
    try:
        for node in nodes:
            await node.ready()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@pytest_twisted.ensureDeferred
async def test_nodes_are_aggregated_and_a_dead_one_drops_out(two_nodes: list[Node]) -> None:
    a, b = two_nodes
    on_a = [await a.connect("?channel=shared") for _ in range(2)]
    on_b = [await b.connect("?channel=shared") for _ in range(3)]
    for client in (*on_a, *on_b):
        await client.next_of("subscribed")

    async def view(node: Node) -> Any:
        return (await call(node, "GET", "/admin/api/nodes", bearer=KEY))[2]

    async def both_seen(node: Node) -> bool:
        v = await view(node)
        return (
            v["totals"]["nodes"] == 2
            and v["totals"]["connections"] == 5
            and {"channel": "shared", "subscribers": 5} in v["top_subscribers"]
        )

    # Each node serves the same view of both.
    await wait_for(lambda: both_seen(a), what="node a to see both nodes")
    await wait_for(lambda: both_seen(b), what="node b to see both nodes")
    addresses = {tuple(n["addresses"]) for n in (await view(a))["nodes"]}
    assert addresses == {(f"127.0.0.1:{a.port}",), (f"127.0.0.1:{b.port}",)}

    # A node killed without a word is gone from the view within 10 s.
    b.kill(signal.SIGKILL)
    killed = time.monotonic()

    async def alone() -> bool:
        v = await view(a)
        return v["totals"]["nodes"] == 1 and v["totals"]["connections"] == 2

    await wait_for(alone, timeout=12, what="the dead node to drop out")
    assert time.monotonic() - killed < 10
    for client in on_a:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_stop_ends_the_event_streams_at_once() -> None:
    from tests.support import connect_raw

    server = PushdUnderTest.config(admin_key=(KEY,), shutdown_timeout=5.0)
    await server.start()
    try:
        raw = await connect_raw(server.port)
        raw.transport.write(
            b"GET /admin/api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\n\r\n"
        )
        await raw.until(b"event: stats")
        started = time.monotonic()
        assert server.service is not None
        await with_timeout(server.service.stopService())
        # Not the --shutdown-timeout: the stream ended, as /sse's do.
        assert time.monotonic() - started < 2.5
        await with_timeout(raw.lost)
    finally:
        await server.stop()


def test_the_cookie_is_secure_over_tls() -> None:
    class Stub:
        def __init__(self, secure: bool) -> None:
            self.secure = secure
            self.headers: dict[bytes, bytes] = {}

        def isSecure(self) -> bool:
            return self.secure

        def getHeader(self, name: bytes) -> bytes | None:
            return None

        def setHeader(self, name: bytes, value: bytes) -> None:
            self.headers[name] = value

    auth = AdminAuth(PASSWORD, (), Clock())
    for secure in (True, False):
        request = Stub(secure)
        auth.set_cookie(request, auth.make_cookie(), MAX_AGE)  # type: ignore[arg-type]
        assert request.headers[b"set-cookie"].endswith(b"; Secure") is secure
