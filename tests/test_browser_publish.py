"""Publishing from browser pages (the contract's "register user events"; issue 14, point 6).

`POST /channels/{channel}` takes a subscriber token whose `publish` claim grants
the channel (`Authorization: Bearer`, or `?token=` for navigator.sendBeacon),
checked as a subscription's token is, under the client publish rate (per token),
with CORS for allowed origins; API keys keep working. The last test does it in
Chromium, from a page of another origin, with fetch, pushd.js and sendBeacon.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.support import SECRET, PushdUnderTest, StartPushd, token

KEY = "producer-key"
GOOD = "http://app.example"
EVIL = "http://evil.example"
JSON = "application/json"


async def _pushd(start_pushd: StartPushd, **overrides: Any) -> PushdUnderTest:
    return await start_pushd(
        token_secret=SECRET, api_key=(KEY,), allowed_origin=("http://app.*",), **overrides
    )


async def _post(
    pushd: PushdUnderTest,
    channel: str,
    body: bytes,
    *,
    bearer: str | None = None,
    query: str = "",
    ctype: str = JSON,
    origin: str | None = None,
    method: str = "POST",
) -> tuple[int, Any, Any]:
    headers = {"content-type": [ctype]}
    if bearer is not None:
        headers["authorization"] = [f"Bearer {bearer}"]
    if origin is not None:
        headers["origin"] = [origin]
    url = f"{pushd.url}/channels/{channel.replace('#', '%23')}{query}"
    response = await treq.request(method, url, data=body, headers=headers, persistent=False)
    content = await response.content()
    return response.code, response.headers, json.loads(content) if content else None


async def _subscriber(pushd: PushdUnderTest, *channels: str, sub: str | None = None) -> Any:
    query = "&".join(f"channel={c.replace('#', '%23')}" for c in channels)
    client = await pushd.connect(f"?{query}&token={token(sub, list(channels))}")
    for _ in range(len(channels) + (sub is not None)):  # and the personal channel
        assert (await client.next(5))["type"] == "subscribed"
    return client


@pytest_twisted.ensureDeferred
async def test_a_token_with_a_publish_grant_publishes(start_pushd: StartPushd) -> None:
    pushd = await _pushd(start_pushd)
    client = await _subscriber(pushd, "ev.clicks", "dm#u1", sub="u1")
    alice = token("u1", [], ["ev.*", "dm#*"])

    # Authorization: Bearer, JSON
    status, headers, body = await _post(pushd, "ev.clicks", b'{"button":"buy"}', bearer=alice)
    assert status == 200 and body["channel"] == "ev.clicks", body
    got = await client.next(5)
    assert (got["id"], got["data"]) == (body["id"], {"button": "buy"})
    assert headers.getRawHeaders("www-authenticate") is None

    # ?token= with what navigator.sendBeacon sends for a string: published as text
    query = f"?token={alice}"
    ctype = "text/plain;charset=UTF-8"
    status, _, body = await _post(pushd, "ev.clicks", b"left the page", query=query, ctype=ctype)
    assert status == 200, body
    assert (await client.next(5))["data"] == "left the page"

    # a user channel: only its users, whatever the grant says
    status, _, body = await _post(pushd, "dm#u1", b'"hi"', bearer=alice)
    assert status == 200, body
    assert (await client.next(5))["data"] == "hi"
    status, _, body = await _post(pushd, "dm#u1", b'"hi"', bearer=token("u2", [], ["dm#*"]))
    assert (status, body["error"]) == (403, "forbidden")

    # API keys keep working
    status, _, body = await _post(pushd, "ev.clicks", b'"from the backend"', bearer=KEY)
    assert status == 200, body
    assert (await client.next(5))["data"] == "from the backend"
    await client.nothing_more()
    await client.close()


REFUSED = [
    pytest.param({"bearer": token("u1", ["*"], ["other.*"])}, 403, "forbidden", id="no-grant"),
    pytest.param({"bearer": token("u1", ["ev.*"])}, 403, "forbidden", id="subscribe-grant-only"),
    pytest.param({"bearer": token("u1", [], ["ev.*"], ttl=-5)}, 401, "token_expired", id="expired"),
    pytest.param({"bearer": "not.a.token"}, 401, "bad_token", id="garbage"),
    pytest.param(
        {"bearer": token("u1", [], ["ev.*"], secret="another-secret-of-32-bytes-or-more")},
        401,
        "bad_token",
        id="other-secret",
    ),
    pytest.param(
        {"query": "?token=" + token("u1", [], ["ev.*"], ttl=-5)}, 401, "token_expired", id="query"
    ),
    pytest.param({"bearer": "wrong-key"}, 401, "unauthorized", id="wrong-api-key"),
    pytest.param({}, 401, "unauthorized", id="nothing"),
    pytest.param(
        {"bearer": token("u1", [], ["ev.*"]), "origin": EVIL}, 403, "forbidden", id="origin"
    ),
]


@pytest.mark.parametrize(("how", "status", "code"), REFUSED)
@pytest_twisted.ensureDeferred
async def test_refused_browser_publishes_change_nothing(
    start_pushd: StartPushd, how: dict[str, Any], status: int, code: str
) -> None:
    pushd = await _pushd(start_pushd)
    client = await _subscriber(pushd, "ev.clicks")
    got_status, headers, body = await _post(pushd, "ev.clicks", b"{}", **how)
    assert (got_status, body["error"]) == (status, code), body
    assert headers.getRawHeaders("content-type") == [JSON]
    if status == 401:
        assert headers.getRawHeaders("www-authenticate")
    assert headers.getRawHeaders("access-control-allow-origin") is None
    await client.nothing_more()
    await client.close()


@pytest_twisted.ensureDeferred
async def test_tokens_publish_on_post_channels_only(start_pushd: StartPushd) -> None:
    pushd = await _pushd(start_pushd)
    alice = token("u1", ["*"], ["*"])
    status, _, body = await _post(pushd, "ev.x", b"", bearer=alice, method="GET")
    assert (status, body["error"]) == (401, "unauthorized")
    status, _, body = await _post(pushd, "ev.x", b"", bearer=alice, method="DELETE")
    assert (status, body["error"]) == (401, "unauthorized")
    response = await treq.post(
        f"{pushd.url}/publish",
        b'{"channel":"ev.x","data":1}',
        headers={"authorization": [f"Bearer {alice}"], "content-type": [JSON]},
        persistent=False,
    )
    assert response.code == 401, await response.text()


@pytest_twisted.ensureDeferred
async def test_without_a_token_secret_tokens_are_refused(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(api_key=(KEY,))
    status, _, body = await _post(pushd, "ev.x", b"1", bearer=token("u1", [], ["*"]))
    assert (status, body["error"]) == (401, "unauthorized")


@pytest_twisted.ensureDeferred
async def test_bad_bodies_and_names_with_a_token(start_pushd: StartPushd) -> None:
    pushd = await _pushd(start_pushd)
    alice = token("u1", [], ["*"])
    status, _, body = await _post(pushd, "ev.x", b'{"x": 1e400}', bearer=alice)
    assert (status, body["error"]) == (400, "bad_json")
    status, _, body = await _post(pushd, "bad%20name", b"1", bearer=alice)
    assert (status, body["error"]) == (400, "bad_channel")
    big = b"x" * (pushd.cfg.max_message_size + 1)
    status, _, body = await _post(pushd, "ev.x", big, bearer=alice, ctype="text/plain")
    assert (status, body["error"]) == (413, "too_large")


@pytest_twisted.ensureDeferred
async def test_cors_preflight_and_answers(start_pushd: StartPushd) -> None:
    pushd = await _pushd(start_pushd)
    url = f"{pushd.url}/channels/ev.clicks"
    preflight = {
        "origin": [GOOD],
        "access-control-request-method": ["POST"],
        "access-control-request-headers": ["authorization,content-type,idempotency-key"],
    }
    response = await treq.request("OPTIONS", url, headers=preflight, persistent=False)
    assert response.code == 204
    assert await response.content() == b""
    h = response.headers
    assert h.getRawHeaders("access-control-allow-origin") == [GOOD]
    assert h.getRawHeaders("access-control-allow-methods") == ["POST"]
    allowed = {
        v.strip().lower() for v in h.getRawHeaders("access-control-allow-headers")[0].split(",")
    }
    assert allowed == {"authorization", "content-type", "idempotency-key"}
    assert int(h.getRawHeaders("access-control-max-age")[0]) > 0
    assert "Origin" in h.getRawHeaders("vary")
    assert h.getRawHeaders("content-length") is None  # a 204 has none

    refused = {**preflight, "origin": [EVIL]}
    response = await treq.request("OPTIONS", url, headers=refused, persistent=False)
    assert response.code == 403
    assert (await response.json())["error"] == "forbidden"
    assert response.headers.getRawHeaders("access-control-allow-origin") is None

    # The answers carry the headers too, errors included, so a page can read them.
    alice = token("u1", [], ["ev.*"])
    for channel, status in (("ev.clicks", 200), ("secret", 403)):
        code, headers, _ = await _post(pushd, channel, b"1", bearer=alice, origin=GOOD)
        assert code == status
        assert headers.getRawHeaders("access-control-allow-origin") == [GOOD]


@pytest_twisted.ensureDeferred
async def test_a_refused_origin_publishes_nothing_with_a_key_either(
    start_pushd: StartPushd,
) -> None:
    pushd = await _pushd(start_pushd)
    client = await _subscriber(pushd, "ev.x")
    status, headers, body = await _post(pushd, "ev.x", b"1", bearer=KEY, origin=EVIL)
    assert (status, body["error"]) == (403, "forbidden")
    assert headers.getRawHeaders("access-control-allow-origin") is None
    status, headers, body = await _post(pushd, "ev.x", b"1", bearer=KEY, origin=GOOD)
    assert status == 200 and headers.getRawHeaders("access-control-allow-origin") == [GOOD]
    assert (await client.next(5))["id"] == body["id"]
    await client.nothing_more()
    await client.close()


@pytest_twisted.ensureDeferred
async def test_browser_publishes_in_one_read_get_cors_too(start_pushd: StartPushd) -> None:
    from tests.support import connect_raw

    pushd = await start_pushd(token_secret=SECRET, allowed_origin=(GOOD,))  # loopback, no key
    answers = []
    for origin in (GOOD, EVIL):
        raw = await connect_raw(pushd.port)
        raw.transport.write(
            b"POST /channels/ev.x HTTP/1.1\r\nHost: pushd\r\nOrigin: %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1\r\n\r\n1" % origin.encode()
        )
        answers.append(await raw.until(b"}"))
        raw.transport.loseConnection()
    assert b"\r\nAccess-Control-Allow-Origin: " + GOOD.encode() in answers[0], answers[0]
    assert answers[1].startswith(b"HTTP/1.1 403 "), answers[1]


@pytest_twisted.ensureDeferred
async def test_any_origin_when_none_is_configured(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(token_secret=SECRET, api_key=(KEY,))
    status, headers, _ = await _post(
        pushd, "ev.x", b"1", bearer=token("u1", [], ["ev.*"]), origin=EVIL
    )
    assert status == 200
    assert headers.getRawHeaders("access-control-allow-origin") == [EVIL]


@pytest_twisted.ensureDeferred
async def test_the_publish_rate_is_per_token(start_pushd: StartPushd) -> None:
    pushd = await _pushd(start_pushd, publish_rate=0.5, publish_burst=3)
    alice, bob = token("alice", [], ["ev.*"]), token("bob", [], ["ev.*"])
    codes = [(await _post(pushd, "ev.x", b"1", bearer=alice))[0] for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    status, _, body = await _post(pushd, "ev.x", b"1", query=f"?token={alice}")
    assert (status, body["error"]) == (429, "rate_limited")
    assert (await _post(pushd, "ev.x", b"1", bearer=bob))[0] == 200  # another token
    assert (await _post(pushd, "ev.x", b"1", bearer=KEY))[0] == 200  # producers: no such limit
    # A refused publish (no grant, bad JSON) takes nothing from the token's rate.
    carol = token("carol", [], ["ev.*"])
    for _ in range(5):
        assert (await _post(pushd, "ev.x", b"{", bearer=carol))[0] == 400
    assert (await _post(pushd, "ev.x", b"1", bearer=carol))[0] == 200


def test_keyed_buckets_stay_bounded() -> None:
    from twisted.internet.task import Clock

    from pushd.limits import KeyedBuckets

    clock = Clock()
    buckets = KeyedBuckets(rate=1.0, burst=2, clock=clock, max_keys=3)
    assert all(buckets.take(k) for k in "abc")
    assert not buckets.take("d")  # full of keys that are busy
    clock.advance(2.0)  # refilled: forgetting them changes nothing
    assert buckets.take("d") and len(buckets) == 1
    assert buckets.take("e", expires=clock.seconds() + 0.5)
    assert buckets.take("f")
    clock.advance(1.0)  # e's token expired
    assert buckets.take("g") and "e" not in buckets._buckets
    assert buckets.take("g") and not buckets.take("g")  # burst 2


# -- in Chromium, from a page of another origin

PAGE = b"""<!doctype html><title>app</title><p>an application page</p>"""


class _Page(Resource):
    """The application's own server: its page, and pushd.js copied from pushd's."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        if request.path == b"/pushd.js":
            from importlib.resources import files

            request.setHeader(b"content-type", b"text/javascript; charset=utf-8")
            return (files("pushd") / "static" / "pushd.js").read_bytes()
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return PAGE


PAGE_SCRIPT = """async ({pushd, token, channel}) => {
  const url = `${pushd}/channels/${channel}`;
  const out = {};
  // fetch with Authorization: a preflight, then the publish; the answer is readable (CORS)
  const r = await fetch(url, {
    method: "POST",
    headers: {authorization: `Bearer ${token}`, "content-type": "application/json",
              "idempotency-key": "page-1"},
    body: JSON.stringify({via: "fetch"}),
  });
  out.fetch = {status: r.status, body: await r.json()};
  // pushd.js: no WebSocket open (never connected), so publish() POSTs
  const { PushdClient } = await import("/pushd.js");
  const client = new PushdClient({url: pushd, token: async () => token, autoConnect: false});
  out.client = await client.publish(channel, {via: "pushd.js"});
  out.refused = await client.publish("secret", 1).catch((e) => ({code: e.code, status: e.status}));
  // sendBeacon: no headers, so ?token=; a string goes as text/plain;charset=UTF-8
  out.beacon = navigator.sendBeacon(`${url}?token=${encodeURIComponent(token)}`, "via beacon");
  return out;
}"""

REFUSED_PAGE_SCRIPT = """async ({pushd, token, channel}) => {
  const url = `${pushd}/channels/${channel}`;
  const fetched = await fetch(url, {
    method: "POST",
    headers: {authorization: `Bearer ${token}`, "content-type": "application/json"},
    body: "1",
  }).then((r) => `answered ${r.status}`, (e) => `refused: ${e.name}`);
  const beacon = navigator.sendBeacon(`${url}?token=${encodeURIComponent(token)}`, "evil beacon");
  return {fetched, beacon};
}"""


@pytest_twisted.ensureDeferred
async def test_chromium_publishes_from_another_origin(browser: Any, page: Any) -> None:
    site = Site(_Page())
    listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    page_port = listening.getHost().port
    app = f"http://127.0.0.1:{page_port}"  # allowed
    other = f"http://localhost:{page_port}"  # the same page, from an origin not allowed
    server = PushdUnderTest.config(
        token_secret=SECRET, api_key=(KEY,), allowed_origin=(app,), publish_burst=20
    )
    await server.start()
    try:
        client = await _subscriber(server, "ev.page")
        alice = token("alice", [], ["ev.*"])
        args = {"pushd": server.url, "token": alice, "channel": "ev.page"}

        def from_app() -> Any:
            page.goto(app + "/")
            return page.evaluate(PAGE_SCRIPT, args)

        result = await browser.call(from_app)
        assert result["fetch"]["status"] == 200, result
        assert result["fetch"]["body"]["channel"] == "ev.page"
        assert result["client"]["channel"] == "ev.page" and result["client"]["id"], result
        assert result["refused"] == {"code": "forbidden", "status": 403}
        assert result["beacon"] is True
        got = [await client.next(10) for _ in range(3)]
        assert [m["data"] for m in got] == [{"via": "fetch"}, {"via": "pushd.js"}, "via beacon"]
        assert [m["id"] for m in got[:2]] == [result["fetch"]["body"]["id"], result["client"]["id"]]

        def from_other() -> Any:
            page.goto(other + "/")
            return page.evaluate(REFUSED_PAGE_SCRIPT, args)

        refused = await browser.call(from_other)
        assert refused["fetched"] == "refused: TypeError", refused  # the preflight said no
        assert refused["beacon"] is True  # sent, and refused by pushd: 403
        # Nothing from that origin arrives: a producer's message, sent once the
        # beacon has had time to arrive, is the next one.
        await deferLater(reactor, 1.0, lambda: None)
        status, _, answer = await _post(server, "ev.page", b'"marker"', bearer=KEY)
        assert status == 200, answer
        marker = answer["id"]
        got = await client.next(10)
        assert (got["id"], got["data"]) == (marker, "marker"), got
        # Chromium says why: the preflight (and only that) failed, for the other origin.
        blocked = [p for p in page.problems if "blocked by CORS policy" in p]
        assert [p for p in page.problems if p not in blocked] == []
        assert len(blocked) == 1 and other in blocked[0] and "preflight" in blocked[0], blocked
        await client.close()
    finally:
        await server.stop()
        await listening.stopListening()


# The browser fixtures of tests/test_browser.py (Chromium through Playwright's sync API);
# without Chromium or Playwright, only the test above is skipped.
try:
    from tests.test_browser import browser, page
except pytest.skip.Exception as e:
    _why = str(e)

    @pytest.fixture
    def browser() -> Any:
        pytest.skip(_why)

    @pytest.fixture
    def page() -> Any:
        pytest.skip(_why)
