"""Presence in the browser: pushd.js's presence() and join/leave events, and the demo
page's Members panel, in a real headless Chromium (driven as tests/test_browser.py
drives it) against a real pushd (`twistd`) with `--presence 'room:*' --join-leave 'room:*'`
on the memory broker (the demo page is on)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.support import Node
from tests.test_browser import Browser, new_page

PRESENCE = ("--presence", "room:*", "--join-leave", "room:*")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    b = Browser()
    b.start()
    yield b
    b.stop()


@pytest.fixture
def pages(browser: Browser) -> Iterator[Callable[[], Any]]:
    """Makes fresh pages, each in a context of its own (a browser of its own, as two
    people are); uncaught exceptions and console errors end up in `page.problems`."""
    made: list[Any] = []

    def new() -> Any:
        p = new_page(browser)
        made.append(p)
        return p

    yield lambda: browser.run(new)

    def close() -> None:
        for p in made:
            if not p.is_closed():
                p.context.close()

    browser.run(close)


@pytest_twisted.async_yield_fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    node = Node(tmp_path, *PRESENCE)
    node.start()
    try:
        await node.ready()
        yield node
    finally:
        node.stop()


def roster(channel: str) -> str:
    return f'#members .members[data-channel="{channel}"]'


def members_of(page: Any, channel: str) -> list[str]:
    return page.eval_on_selector_all(
        f"{roster(channel)} li", "items => items.map((li) => li.dataset.client)"
    )


def wait_for_members(page: Any, channel: str, n: int) -> list[str]:
    page.wait_for_function(
        "([sel, n]) => document.querySelector(sel)?.dataset.state === 'on'"
        " && document.querySelectorAll(sel + ' li').length === n",
        arg=[roster(channel), n],
    )
    return members_of(page, channel)


@pytest_twisted.ensureDeferred
async def test_demo_page_shows_who_is_in_the_channel(
    browser: Browser, node: Node, pages: Callable[[], Any]
) -> None:
    first, second, elsewhere = pages(), pages(), pages()

    def two_join() -> tuple[list[str], list[str], str]:
        first.set_viewport_size({"width": 390, "height": 844})  # a phone
        first.goto(f"{node.url}/?channel=room:1")
        wait_for_members(first, "room:1", 1)
        second.goto(f"{node.url}/?channel=room:1")
        # Each sees the other: the second in its answer to presence(), the first by the
        # second's join.
        seen_by_second = wait_for_members(second, "room:1", 2)
        seen_by_first = wait_for_members(first, "room:1", 2)
        status = first.text_content(f"{roster('room:1')} .status")
        return seen_by_first, seen_by_second, status

    seen_by_first, seen_by_second, status = await browser.call(two_join)
    assert sorted(seen_by_first) == sorted(seen_by_second)
    assert len(set(seen_by_first)) == 2
    assert status.startswith("2 members"), status

    def narrow() -> Any:
        return first.evaluate(
            """sel => ({
                 width: document.documentElement.scrollWidth,
                 panel: document.querySelector(sel).getBoundingClientRect().right,
               })""",
            roster("room:1"),
        )

    layout = await browser.call(narrow)
    assert layout["width"] <= 390 and layout["panel"] <= 390, layout

    def second_leaves() -> list[str]:
        second.context.close()
        return wait_for_members(first, "room:1", 1)

    left = await browser.call(second_leaves)
    assert len(left) == 1 and left[0] in seen_by_first

    def no_presence() -> Any:
        elsewhere.goto(f"{node.url}/?channel=lobby")
        box = roster("lobby")
        elsewhere.wait_for_selector(f'{box}[data-state="off"]')
        return elsewhere.text_content(f"{box} .status"), members_of(elsewhere, "lobby")

    text, listed = await browser.call(no_presence)
    assert "presence is off" in text and "presence_off" in text, text
    assert listed == []
    for p in (first, second, elsewhere):
        assert p.problems == []


# Run in a page pushd serves: PushdClients recording what presence() and the
# join/leave events give, on window.
CLIENTS = """
async () => {
  const { PushdClient, PushdError } = await import("/pushd.js");
  window.PushdClient = PushdClient;
  window.PushdError = PushdError;
  window.events = [];
  window.make = (name, options = {}) => {
    const client = new PushdClient({ minDelay: 100, maxDelay: 500, ...options });
    for (const type of ["join", "leave"]) {
      client.on(type, (channel, member) => window.events.push({ name, type, channel, member }));
    }
    return client;
  };
  window.subscribed = (client, channel) =>
    new Promise((resolve) => {
      const off = client.on("subscribed", (c) => { if (c === channel) { off(); resolve(); } });
      client.subscribe(channel);
    });
  window.code = (promise) => promise.then((answer) => ({ answer }), (e) => ({
    code: e.code, channel: e.channel, isPushdError: e instanceof PushdError,
  }));
}
"""


@pytest_twisted.ensureDeferred
async def test_pushd_js_presence_and_join_leave_events(
    browser: Browser, node: Node, pages: Callable[[], Any]
) -> None:
    page = pages()

    def run() -> Any:
        page.goto(f"{node.url}/health")
        page.evaluate(CLIENTS)
        return page.evaluate(
            """async () => {
              const a = make("a"), b = make("b");
              await subscribed(a, "room:5");
              const alone = await a.presence("room:5");
              window.aClient = alone.clients[0].client;
              await subscribed(b, "room:5");
              const [fromA, fromB] =
                await Promise.all([a.presence("room:5"), b.presence("room:5")]);
              // Several at once on one channel settle in the order asked.
              const three = await Promise.all([1, 2, 3].map(() => a.presence("room:5")));
              const notSubscribed = await code(a.presence("room:6"));
              await subscribed(a, "lobby");
              const off = await code(a.presence("lobby"));
              const after = await a.presence("room:5");  // still answers after refusals
              const idle = await code(make("idle", { autoConnect: false }).presence("room:5"));
              return { alone, fromA, fromB, three, notSubscribed, off, after, idle };
            }"""
        )

    seen = await browser.call(run)
    [a_member] = seen["alone"]["clients"]
    assert seen["alone"] == {"channel": "room:5", "count": 1, "users": 0, "clients": [a_member]}
    assert a_member["user"] is None and a_member["info"] is None  # anonymous
    assert seen["fromA"]["count"] == seen["fromB"]["count"] == 2
    clients = {m["client"] for m in seen["fromA"]["clients"]}
    assert clients == {m["client"] for m in seen["fromB"]["clients"]}
    [b_client] = clients - {a_member["client"]}
    assert [answer["count"] for answer in seen["three"]] == [2, 2, 2]
    assert seen["notSubscribed"] == {"code": "forbidden", "channel": "room:6", "isPushdError": True}
    assert seen["off"] == {"code": "presence_off", "channel": "lobby", "isPushdError": True}
    assert seen["after"]["count"] == 2
    assert seen["idle"]["code"] == "not_connected"

    # A client on SSE: no presence(), but the join/leave events, here of a client c
    # that comes and goes after it subscribed. (c stays until its coming is told: pushd
    # never announces one that comes and goes within its 0.25 s window.)
    def sse() -> Any:
        return page.evaluate(
            """async () => {
              const s = make("s", { transport: "sse" });
              await subscribed(s, "room:5");
              const unsupported = await code(s.presence("room:5"));
              const c = make("c");
              await subscribed(c, "room:5");
              // a has heard every other member come, c included.
              const { clients } = await c.presence("room:5");
              const heard = (client) => window.events.some(
                (e) => e.name === "a" && e.type === "join" && e.member.client === client);
              await new Promise((resolve) => {
                const check = () => {
                  if (clients.every((m) => m.client === window.aClient || heard(m.client))) {
                    resolve();
                  } else {
                    setTimeout(check, 20);
                  }
                };
                check();
              });
              c.close();
              return { unsupported };
            }"""
        )

    result = await browser.call(sse)
    assert result["unsupported"] == {
        "code": "not_supported",
        "channel": "room:5",
        "isPushdError": True,
    }

    def events() -> Any:
        # a saw b join; s (on SSE) saw c come and go; a saw c come and go too.
        page.wait_for_function(
            """() => ["a", "s"].every((name) =>
                 window.events.some((e) => e.name === name && e.type === "leave"))"""
        )
        return page.evaluate("window.events")

    got = await browser.call(events)
    a_events = [(e["type"], e["member"]["client"]) for e in got if e["name"] == "a"]
    s_events = [(e["type"], e["member"]["client"]) for e in got if e["name"] == "s"]
    assert ("join", b_client) in a_events
    assert all(e["channel"] == "room:5" for e in got)
    # Only c left (b is still there); s heard it come, then go, on SSE.
    [c_client] = [client for kind, client in a_events if kind == "leave"]
    assert ("join", c_client) in a_events
    assert ("join", c_client) in s_events and ("leave", c_client) in s_events, s_events
    assert s_events.index(("join", c_client)) < s_events.index(("leave", c_client)), s_events
    assert page.problems == []


@pytest_twisted.ensureDeferred
async def test_a_presence_waiting_when_the_connection_drops_fails(
    browser: Browser, node: Node, pages: Callable[[], Any]
) -> None:
    """Playwright stands between the page and pushd, swallows the presence frame and
    then drops the connection: the promise fails with connection_lost; after the
    reconnect presence() answers again."""
    page = pages()
    routes: list[Any] = []

    def run() -> Any:
        def route(ws: Any) -> None:
            server = ws.connect_to_server()
            routes.append(ws)

            cut = False

            def to_server(message: Any) -> None:
                nonlocal cut
                if cut:  # (the client's ping after the presence frame, say)
                    return
                if '"presence"' in str(message) and len(routes) == 1:
                    cut = True
                    server.close()  # pushd's side goes too, as it would with a real network
                    ws.close(code=1011, reason="gone")
                else:
                    server.send(message)

            ws.on_message(to_server)

        page.route_web_socket("**/ws*", route)
        page.goto(f"{node.url}/health")
        page.evaluate(CLIENTS)
        return page.evaluate(
            """async () => {
              const a = make("a");
              await subscribed(a, "room:7");
              const again = new Promise((resolve) =>
                a.on("subscribed", (c) => c === "room:7" && resolve()));
              const lost = await code(a.presence("room:7"));
              await again;
              // Until pushd has seen the old connection go (polled, under its rate limit).
              const deadline = Date.now() + 8000;
              let answer = await a.presence("room:7");
              while (answer.count !== 1 && Date.now() < deadline) {
                await new Promise((resolve) => setTimeout(resolve, 200));
                answer = await a.presence("room:7");
              }
              return { lost, answer };
            }"""
        )

    seen = await browser.call(run)
    assert seen["lost"] == {"code": "connection_lost", "channel": "room:7", "isPushdError": True}
    assert seen["answer"]["count"] == 1, seen
    assert len(routes) == 2
    assert page.problems == []
