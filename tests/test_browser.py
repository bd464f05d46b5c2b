"""The browser side: pushd.js and the demo page, in a real headless Chromium.

Playwright's sync API runs on one thread of its own (its objects belong to the
thread that made them) while pushd runs in the reactor, in-process or as a
`twistd` Node; `Browser.call` runs a function there and answers a Deferred.
Needs `pip install playwright` and Debian's chromium (no `playwright install`).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.support import (
    SECRET,
    Node,
    PushdUnderTest,
    RedisServer,
    redis_options,
    token,
    wait_for,
)

pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("PUSHD_TEST_CHROMIUM", "/usr/bin/chromium")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no chromium at {CHROMIUM}", allow_module_level=True)

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
RECORDER = (Path(__file__).parent / "pages" / "recorder.js").read_text()
WAIT_MS = 10_000


class Browser:
    """Chromium driven by Playwright's sync API on a thread of its own."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="playwright")
        self._playwright: Any = None
        self.chromium: Any = None

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn` on the browser's thread and wait for it (outside the reactor only)."""
        return self._thread.submit(fn, *args, **kwargs).result()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Run `fn` on the browser's thread; a Deferred of its result, for the reactor."""
        d: Deferred[Any] = Deferred()

        def done(future: Future[Any]) -> None:
            error = future.exception()
            if error is not None:
                reactor.callFromThread(d.errback, error)
            else:
                reactor.callFromThread(d.callback, future.result())

        self._thread.submit(fn, *args, **kwargs).add_done_callback(done)
        return d

    def start(self) -> None:
        def launch() -> None:
            from playwright.sync_api import sync_playwright

            self._playwright = sync_playwright().start()
            self.chromium = self._playwright.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS
            )

        self.run(launch)

    def stop(self) -> None:
        def close() -> None:
            if self.chromium is not None:
                self.chromium.close()
            if self._playwright is not None:
                self._playwright.stop()

        try:
            self.run(close)
        finally:
            self._thread.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    b = Browser()
    b.start()
    yield b
    b.stop()


def new_page(browser: Browser) -> Any:
    """A page in a context of its own (run on the browser's thread); its uncaught
    exceptions and console errors end up in `page.problems` (not the browser's own
    lines about failed requests: refusals are part of the tests)."""
    context = browser.chromium.new_context()
    p = context.new_page()
    p.problems = []
    p.on("pageerror", lambda e: p.problems.append(f"pageerror: {e}"))
    p.on(
        "console",
        lambda m: (
            m.type == "error"
            and not m.text.startswith(("Failed to load resource", "WebSocket connection to"))
            and p.problems.append(f"console: {m.text}")
        ),
    )
    p.set_default_timeout(WAIT_MS)
    return p


@pytest.fixture
def page(browser: Browser) -> Iterator[Any]:
    """A fresh page; its uncaught exceptions and console errors end up in `page.problems`
    (not the browser's own lines about failed requests: refusals are part of the tests)."""

    p = browser.run(lambda: new_page(browser))
    yield p
    browser.run(p.context.close)


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


def id_key(msg_id: str) -> tuple[int, int]:
    ms, seq = msg_id.split("-")
    return int(ms), int(seq)


def open_recorder(page: Any, origin: str, **options: Any) -> None:
    """pages/recorder.js in a page pushd serves (/health), so that /pushd.js and the
    connections are same-origin. (A page Playwright fulfils itself is not: Chromium's
    local network access checks then refuse its WebSocket to loopback.)"""
    page.goto(f"{origin}/health")
    page.evaluate(RECORDER, options)
    page.wait_for_function("window.subscribed.length >= 1")


@pytest_twisted.async_yield_fixture
async def demo_pushd() -> Any:
    """pushd in-process on the memory broker: the demo page is on."""
    server = PushdUnderTest.config()
    await server.start()
    yield server
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_demo_page_joins_shows_and_publishes(
    browser: Browser, demo_pushd: PushdUnderTest, page: Any
) -> None:
    server = demo_pushd

    def join() -> str:
        page.goto(server.url + "/")
        assert page.title() == "pushd demo"
        page.fill("#channel", "lobby")
        page.click("#join")
        page.wait_for_selector('#channels li.subscribed[data-channel="lobby"]')
        page.wait_for_selector('#state[data-state="open"]')
        return page.text_content("#state")

    assert await browser.call(join) == "open"

    # A producer's message shows up on the page.
    msg_id = await server.publish("lobby", {"text": "from a producer"})

    def shown(msg_id: str) -> str:
        return page.text_content(f'#messages li[data-id="{msg_id}"] .data', timeout=WAIT_MS)

    assert json.loads(await browser.call(shown, msg_id)) == {"text": "from a producer"}

    # Publishing from the page: text, then JSON; each shows its id and comes back.
    def publish(text: str, fmt: str) -> tuple[str, str]:
        page.fill("#publish-channel", "lobby")
        page.fill("#publish-data", text)
        page.select_option("#publish-format", fmt)
        page.evaluate("document.getElementById('publish-result').textContent = ''")
        page.click("#publish")
        page.wait_for_selector("#publish-result.ok, #publish-result.error")
        return page.get_attribute("#publish-result", "class"), page.text_content("#publish-result")

    kind, text = await browser.call(publish, "hello from the page", "text")
    assert kind == "ok", text
    page_id = text.rsplit(" ", 1)[-1]
    assert await browser.call(shown, page_id) == "hello from the page"

    kind, text = await browser.call(publish, '{"n": 1}', "auto")
    assert kind == "ok", text
    assert json.loads(await browser.call(shown, text.rsplit(" ", 1)[-1])) == {"n": 1}

    # A refused publish shows pushd's error and publishes nothing.
    kind, text = await browser.call(publish, "{not json", "json")
    assert kind == "error" and "bad_json" in text, text
    count = await browser.call(page.locator("#messages li").count)
    assert count == 3
    assert page.problems == []


@pytest.mark.parametrize(("transport", "expected"), [("auto", "websocket"), ("sse", "sse")])
@pytest_twisted.ensureDeferred
async def test_every_message_once_in_order_across_a_pushd_restart(
    browser: Browser,
    page: Any,
    tmp_path: Path,
    redis_server: RedisServer,
    prefix: str,
    transport: str,
    expected: str,
) -> None:
    node = Node(tmp_path, *redis_options([redis_server], prefix, "--shutdown-timeout", "2"))
    node.start()
    try:
        await node.ready()

        await browser.call(open_recorder, page, node.url, channel="feed", transport=transport)

        accepted: dict[int, str] = {}  # n -> id, for every POST answered 200
        uncertain: set[int] = set()  # POSTs without an answer: published or not
        state = {"n": 0, "running": True}

        async def produce() -> None:
            while state["running"]:
                state["n"] += 1
                n = state["n"]
                try:
                    response = await treq.post(
                        f"{node.url}/channels/feed",
                        json.dumps({"n": n}).encode(),
                        headers={"content-type": ["application/json"]},
                        persistent=False,
                        timeout=5,
                    )
                    body = await response.json()
                    if response.code == 200:
                        accepted[n] = body["id"]
                    else:
                        uncertain.add(n)
                except Exception:
                    uncertain.add(n)
                    await sleep(0.02)
                await sleep(0.01)

        producing = Deferred.fromCoroutine(produce())
        await wait_for(lambda: len(accepted) >= 20, what="messages before the restart")
        status = await deferToThread(node.kill, signal.SIGTERM)
        assert status in (0, -signal.SIGTERM, 128 + signal.SIGTERM), status
        before = len(accepted)
        await sleep(0.3)  # producers meet a closed port meanwhile
        node.start()
        await node.ready()
        await wait_for(lambda: len(accepted) >= before + 20, what="messages after the restart")
        state["running"] = False
        await producing
        assert uncertain, "no publish met the stopped pushd: the restart went unnoticed"

        ids = [accepted[n] for n in sorted(accepted)]

        def everything() -> dict[str, Any]:
            page.wait_for_function(
                "ids => ids.every((id) => window.seen.has(id))", arg=ids, timeout=15_000
            )
            return page.evaluate(
                "({received: window.received, states: window.states,"
                " subscribed: window.subscribed, transport: window.client.transport,"
                " transports: window.transports, errors: window.errors})"
            )

        seen = await browser.call(everything)
    finally:
        node.stop()

    received = seen["received"]
    got = [m["id"] for m in received]
    assert got == sorted(got, key=id_key), "out of order"
    assert len(got) == len(set(got)), "an id delivered twice"
    for m in received:
        n = m["data"]["n"]
        if n in accepted:
            assert accepted[n] == m["id"], m
        else:
            assert n in uncertain, f"message {n} was never published"
    assert set(ids) <= set(got)
    assert "reconnecting" in seen["states"], seen["states"]
    assert seen["states"][-1] == "open"
    assert len(seen["subscribed"]) >= 2
    assert seen["subscribed"][-1]["recovered"] is True, seen["subscribed"]
    assert seen["transport"] == expected, (seen["states"], seen["transports"], seen["errors"])
    assert page.problems == []


@pytest.mark.parametrize("transport", ["auto", "sse"])
@pytest_twisted.ensureDeferred
async def test_a_quiet_channel_is_resumed_across_a_pushd_restart(
    browser: Browser,
    page: Any,
    tmp_path: Path,
    redis_pushd: PushdUnderTest,
    redis_server: RedisServer,
    prefix: str,
    transport: str,
) -> None:
    """The page subscribed to a channel that has delivered nothing; pushd stops; a
    message is published to that channel (on another node: Redis keeps it) while
    it is down; pushd starts again: the page shows the message, once."""
    node = Node(tmp_path, *redis_options([redis_server], prefix, "--shutdown-timeout", "2"))
    node.start()
    try:
        await node.ready()
        await browser.call(open_recorder, page, node.url, channel="quiet", transport=transport)
        assert await browser.call(page.evaluate, "client.lastId('quiet')") == "0-0"
        status = await deferToThread(node.kill, signal.SIGTERM)
        assert status in (0, -signal.SIGTERM, 128 + signal.SIGTERM), status
        await browser.call(page.wait_for_function, "window.client.state === 'reconnecting'")
        missed = await redis_pushd.publish("quiet", {"while": "down"})
        node.start()
        await node.ready()

        def shown() -> Any:
            page.wait_for_function("id => window.seen.has(id)", arg=missed, timeout=15_000)
            return page.evaluate("({received: window.received, subscribed: window.subscribed})")

        seen = await browser.call(shown)
        live = await node.publish("quiet", {"after": "restart"})

        def after() -> Any:
            page.wait_for_function("id => window.seen.has(id)", arg=live)
            return page.evaluate("window.received")

        received = await browser.call(after)
    finally:
        node.stop()
    assert received == [
        {"id": missed, "data": {"while": "down"}},
        {"id": live, "data": {"after": "restart"}},
    ]
    assert len(seen["subscribed"]) >= 2
    assert page.problems == []


# A WebSocket that can never connect (as behind a proxy that drops the upgrade).
NO_WEBSOCKET = """
window.WebSocket = class extends WebSocket {
  constructor(url, protocols) { super("ws://127.0.0.1:9/", protocols); }
};
"""


@pytest.mark.parametrize("http_publish", [False, True])
@pytest_twisted.ensureDeferred
async def test_falls_back_to_sse_when_websockets_fail(
    browser: Browser, demo_pushd: PushdUnderTest, page: Any, http_publish: bool
) -> None:
    server = demo_pushd

    def open_page() -> Any:
        page.add_init_script(NO_WEBSOCKET)
        open_recorder(page, server.url, channel="fb", fallbackAfter=2, httpPublish=http_publish)
        return page.evaluate("({transports: window.transports, states: window.states})")

    seen = await browser.call(open_page)
    assert seen["transports"] == ["websocket", "sse"]
    assert seen["states"][0] == "connecting" and seen["states"][-1] == "open"

    first = await server.publish("fb", {"over": "sse"})

    def publish_from_page() -> Any:
        page.wait_for_function("id => window.seen.has(id)", arg=first)
        return page.evaluate(
            """client.publish("fb", {from: "page"}).then(
                 (answer) => ({ok: answer}), (e) => ({code: e.code}))"""
        )

    result = await browser.call(publish_from_page)
    if not http_publish:
        assert result == {"code": "not_supported"}
        return
    assert result["ok"]["channel"] == "fb"

    def received() -> Any:
        page.wait_for_function("id => window.seen.has(id)", arg=result["ok"]["id"])
        return page.evaluate("window.received")

    assert await browser.call(received) == [
        {"id": first, "data": {"over": "sse"}},
        {"id": result["ok"]["id"], "data": {"from": "page"}},
    ]


@pytest_twisted.ensureDeferred
async def test_token_callback_refresh_and_publishing_over_the_websocket(
    browser: Browser, page: Any
) -> None:
    server = PushdUnderTest.config(token_secret=SECRET)
    await server.start()
    try:
        # The first token expires in one to two seconds: pushd closes with 4001 and
        # the client asks its callback again and carries on with the second one.
        short = token("alice", channels=["room"], publish=["room"], ttl=2)
        long = token("alice", channels=["room"], publish=["room"])

        def open_page() -> None:
            open_recorder(page, server.url, channel="room", tokens=[short, long])
            page.wait_for_function("window.subscribed.length >= 2", timeout=8_000)

        await browser.call(open_page)
        first = await server.publish("room", {"after": "refresh"})

        def publish() -> Any:
            page.wait_for_function("id => window.seen.has(id)", arg=first)
            return page.evaluate(
                """async () => {
                  const ok = await client.publish("room", {from: "page"});
                  const refused = await client.publish("elsewhere", 1).catch((e) => e.code);
                  const bad = await client.publish("room", undefined).catch((e) => e.code);
                  return {ok, refused, bad, errors: window.errors, calls: window.tokenCalls,
                          states: window.states};
                }"""
            )

        result = await browser.call(publish)
        assert result["ok"] == {"channel": "room"}
        assert result["refused"] == "forbidden"
        assert result["bad"] == "bad_request"
        assert result["calls"] >= 2
        assert {"code": "closed", "message": "token expired", "closeCode": 4001} in result["errors"]
        assert result["states"][-1] == "open"

        def delivered() -> Any:
            page.wait_for_function("window.received.length >= 2")
            return page.evaluate("window.received.map((m) => m.data)")

        assert await browser.call(delivered) == [{"after": "refresh"}, {"from": "page"}]
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_no_reconnect_after_4003(
    browser: Browser, demo_pushd: PushdUnderTest, page: Any
) -> None:
    # Playwright stands between the page and pushd, and plays the application that
    # disconnects the client (pushd's 4003).
    routes: list[Any] = []

    def open_page() -> None:
        def route(ws: Any) -> None:
            ws.connect_to_server()
            routes.append(ws)

        page.route_web_socket("**/ws*", route)
        open_recorder(page, demo_pushd.url, channel="gone")
        routes[0].close(code=4003, reason="banned")
        page.wait_for_function("window.client.state === 'closed'")
        page.wait_for_timeout(800)  # a reconnect would come within minDelay (100 ms)

    await browser.call(open_page)
    assert len(routes) == 1
    seen = await browser.call(page.evaluate, "({states: window.states, errors: window.errors})")
    assert seen["states"] == ["connecting", "open", "closed"]
    assert seen["errors"] == [{"code": "closed", "message": "banned", "closeCode": 4003}]
