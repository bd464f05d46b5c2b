"""The admin console in a real headless Chromium (Playwright, Debian's
chromium), as tests/test_browser.py drives it: log in, watch connections come
and go, publish, disconnect a user; at desktop width and at 390 px. The test
writes screenshots to tests/screenshots/ (git-ignored) for a reviewer."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.support import (
    SECRET,
    Node,
    PushdUnderTest,
    RedisServer,
    WSClient,
    redis_options,
    token,
    with_timeout,
)

pytest.importorskip("playwright.sync_api")

from playwright.sync_api import expect

from tests.test_browser import Browser

PASSWORD = "admin password of the browser tests"
SCREENSHOTS = Path(__file__).parent / "screenshots"
WAIT_MS = 10_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    b = Browser()
    b.start()
    yield b
    b.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Any]:
    """A fresh page; every console message of type error and every uncaught
    exception lands in `page.errors`."""

    def new() -> Any:
        context = browser.chromium.new_context(viewport={"width": 1280, "height": 900})
        p = context.new_page()
        p.errors = []
        p.on("pageerror", lambda e: p.errors.append(f"pageerror: {e}"))
        p.on("console", lambda m: m.type == "error" and p.errors.append(f"console: {m.text}"))
        p.set_default_timeout(WAIT_MS)
        return p

    p = browser.run(new)
    yield p
    browser.run(p.context.close)


@pytest_twisted.async_yield_fixture
async def admin() -> AsyncIterator[PushdUnderTest]:
    server = PushdUnderTest.config(admin_password=PASSWORD, token_secret=SECRET)
    await server.start()
    yield server
    await server.stop()


def log_in(page: Any, url: str, password: str = PASSWORD) -> None:
    page.goto(url + "/admin")
    page.wait_for_selector("#login:not([hidden])")
    page.fill("#password", password)
    page.click("#login-button")


async def connect(server: PushdUnderTest, user: str) -> WSClient:
    client = await server.connect(f"?channel=room&token={token(user, ['*'])}")
    for _ in range(2):  # room and the user's personal channel
        await client.next_of("subscribed")
    return client


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_is_refused(
    browser: Browser, admin: PushdUnderTest, page: Any
) -> None:
    def wrong() -> tuple[str, bool]:
        log_in(page, admin.url, "not the password")
        expect(page.locator("#login-error")).not_to_have_text("")
        return page.text_content("#login-error"), page.is_hidden("#app")

    assert await browser.call(wrong) == ("Wrong password.", True)
    # The one error is the browser's own line about the refused request (401).
    assert all("status of 401" in e for e in page.errors), page.errors


@pytest_twisted.ensureDeferred
async def test_the_console_watches_and_steers(
    browser: Browser, admin: PushdUnderTest, page: Any
) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)

    def logged_in() -> str:
        log_in(page, admin.url)
        page.wait_for_selector("#app:not([hidden])")
        page.wait_for_selector('#live[data-state="open"]')
        expect(page.locator("#total-connections")).to_have_text("0")
        return page.title()

    assert await browser.call(logged_in) == "pushd admin"

    # 7 WebSocket clients: the page shows 7 within 3 s.
    clients = [await connect(admin, f"user-{n}") for n in range(6)]
    victim = await connect(admin, "victim")
    clients.append(victim)

    def shows(n: int) -> str:
        expect(page.locator("#total-connections")).to_have_text(str(n), timeout=3000)
        return page.text_content("#nodes tbody td.connections")

    assert await browser.call(shows, 7) == "7"

    # A channel's page; a message published from it reaches a WebSocket client.
    def publish() -> str:
        page.click('#top-subscribers a:text-is("room")')
        page.wait_for_selector("#channel-view:not([hidden])")
        expect(page.locator("#channel-subscribers")).to_have_text("7")
        page.fill("#publish-data", '{"from": "the admin page"}')
        page.click("#publish-button")
        page.wait_for_selector("#confirm[open]")
        page.click("#confirm-ok")
        page.wait_for_selector('#result[data-state="ok"]')
        return page.text_content("#result")

    result = await browser.call(publish)
    message = await clients[0].next_of("message")
    assert message["data"] == {"from": "the admin page"}
    assert json.loads(result.split(" 200 ", 1)[1]) == {"channel": "room", "id": message["id"]}
    for client in clients[1:]:
        assert (await client.next_of("message"))["id"] == message["id"]

    def listed(msg_id: str) -> str:
        return page.text_content(f'#channel-messages li[data-id="{msg_id}"] .data')

    assert json.loads(await browser.call(listed, message["id"])) == {"from": "the admin page"}

    def screenshot(name: str) -> None:
        page.wait_for_timeout(1500)  # let the plots draw a few points (a picture, not a sync)
        page.screenshot(path=str(SCREENSHOTS / name), full_page=True)

    await browser.call(screenshot, "admin-desktop.png")

    # Disconnect a user from the page: that user's connection closes with 4003.
    def disconnect() -> str:
        page.fill("#user-name", "victim")
        page.click("#disconnect-button")
        page.wait_for_selector("#confirm[open]")
        page.click("#confirm-ok")
        expect(page.locator("#result")).to_have_text(re.compile("^disconnect victim"))
        return page.text_content("#result")

    assert await browser.call(disconnect) == 'disconnect victim: 200 {"nodes":1}'
    _, code, _ = await with_timeout(victim.closed)
    assert code == 4003
    assert await browser.call(shows, 6) == "6"

    # A cancelled confirmation does nothing.
    def cancelled() -> str:
        page.evaluate("document.getElementById('result').textContent = 'unchanged'")
        page.fill("#user-name", "user-0")
        page.click("#disconnect-button")
        page.wait_for_selector("#confirm[open]")
        page.click("#confirm-cancel")
        page.wait_for_selector("#confirm", state="hidden")
        return page.text_content("#result")

    assert await browser.call(cancelled) == "unchanged"

    # Unsubscribe a user from a channel, then delete the channel, from the page.
    def confirmed(button: str, expected: str) -> str:
        page.click(button)
        page.wait_for_selector("#confirm[open]")
        page.click("#confirm-ok")
        expect(page.locator("#result")).to_have_text(re.compile("^" + re.escape(expected)))
        return page.text_content("#result")

    def unsubscribe() -> str:
        page.fill("#user-name", "user-1")
        page.fill("#unsubscribe-channel", "room")
        return confirmed("#unsubscribe-button", "unsubscribe user-1 from room")

    answer = await browser.call(unsubscribe)
    assert answer == 'unsubscribe user-1 from room: 200 {"nodes":1}'
    assert (await clients[1].next_of("unsubscribed"))["channel"] == "room"

    answer = await browser.call(confirmed, "#delete-channel", "delete room")
    assert answer == 'delete room: 200 {"nodes":1}'
    for client in (clients[0], *clients[2:-1]):
        assert (await client.next_of("unsubscribed"))["channel"] == "room"

    def emptied() -> str:
        expect(page.locator("#channel-messages li.none")).to_have_text("no history")
        return page.text_content("#channel-subscribers")

    assert await browser.call(emptied) == "0"

    # They all go: the page shows 0 within 3 s.
    for client in clients[:-1]:
        await client.close()
    assert await browser.call(shows, 0) == "0"

    # 390 px wide: nothing wider than the screen, every part still there.
    def narrow() -> dict[str, Any]:
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(300)  # a relayout (a picture, not a sync)
        page.screenshot(path=str(SCREENSHOTS / "admin-390px.png"), full_page=True)
        return page.evaluate(
            """() => ({
                width: document.documentElement.scrollWidth,
                publish: document.getElementById('publish-button').getBoundingClientRect().right,
                disconnect: document.getElementById('disconnect-button')
                    .getBoundingClientRect().right,
            })"""
        )

    sizes = await browser.call(narrow)
    assert sizes["width"] <= 390 and sizes["publish"] <= 390 and sizes["disconnect"] <= 390
    assert page.errors == []


@pytest_twisted.ensureDeferred
async def test_two_nodes_on_redis_in_one_page(
    browser: Browser, page: Any, redis_server: RedisServer, tmp_path: Path, prefix: str
) -> None:
    options = redis_options([redis_server], prefix, "--admin-password", PASSWORD)
    nodes = [Node(tmp_path, *options) for _ in range(2)]
    for node in nodes:
        node.start()
    try:
        for node in nodes:
            await node.ready()
        a, b = nodes
        on_b = [await b.connect("?channel=lobby") for _ in range(3)]
        for client in on_b:
            await client.next_of("subscribed")

        def both() -> list[str]:
            SCREENSHOTS.mkdir(exist_ok=True)
            log_in(page, a.url)
            page.wait_for_selector("#app:not([hidden])")
            expect(page.locator("#total-nodes")).to_have_text("2")
            expect(page.locator("#total-connections")).to_have_text("3")
            expect(page.locator('#top-subscribers li[data-channel="lobby"] .n')).to_have_text("3")
            page.screenshot(path=str(SCREENSHOTS / "admin-two-nodes.png"), full_page=True)
            return page.locator("#nodes tbody td.connections").all_text_contents()

        # The page is node a's; node b's connections are there, through Redis.
        assert sorted(await browser.call(both)) == ["0", "3"]
        for client in on_b:
            await client.close()
        assert page.errors == []
    finally:
        for node in nodes:
            node.stop()
