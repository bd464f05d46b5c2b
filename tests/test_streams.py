"""Server-Sent Events and NDJSON streaming, read as browsers and curl read them."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from tests.sse import Event, EventStream, open_sse
from tests.support import (
    SECRET,
    PushdUnderTest,
    StartPushd,
    channel_subscriptions,
    connect_raw,
    next_turn,
    token,
    wait_for,
    with_timeout,
)


async def until_live(stream: EventStream) -> list[Event]:
    """Events up to and with the one that says every channel is live (its `id:`
    resumes them all)."""
    events = []
    while True:
        events.append(await stream.next())
        if events[-1].type == "subscribed" and "channels" in json.loads(events[-1].data):
            return events


@pytest_twisted.ensureDeferred
async def test_sse_delivers_ids_and_envelopes(pushd: PushdUnderTest) -> None:
    stream = await open_sse(f"{pushd.url}/sse?channel=news")
    assert stream.response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    subscribed, live = await until_live(stream)
    assert (subscribed.type, subscribed.last_event_id) == ("subscribed", "")
    assert json.loads(subscribed.data) == {
        "type": "subscribed", "channel": "news", "recovered": False, "position": None
    }  # fmt: skip
    # Live: a quiet channel resumes from its beginning.
    assert (live.type, live.last_event_id) == ("subscribed", "0-0")
    assert json.loads(live.data) == {"type": "subscribed", "channels": {"news": "0-0"}}
    msg_id = await pushd.publish("news", {"n": 1})
    event = await stream.next()
    assert (event.type, event.last_event_id) == ("message", msg_id)
    assert json.loads(event.data) == {
        "type": "message", "channel": "news", "id": msg_id, "data": {"n": 1}
    }  # fmt: skip
    stream.close()


@pytest_twisted.ensureDeferred
async def test_sse_resumes_with_last_event_id_on_one_and_many_channels(
    pushd: PushdUnderTest,
) -> None:
    first = await open_sse(f"{pushd.url}/sse?channel=a&channel=b")
    assert len(await until_live(first)) == 3
    await pushd.publish("a", "a1")
    await pushd.publish("b", "b1")
    for _ in range(2):
        await first.next()
    cursor = first.last_event_id
    first.close()
    missed = [await pushd.publish("a", "a2"), await pushd.publish("b", "b2")]

    # The browser reconnects with the Last-Event-ID header: both channels resume.
    again = await open_sse(f"{pushd.url}/sse?channel=a&channel=b", {"Last-Event-ID": cursor})
    events = [json.loads(e.data) for e in await until_live(again)]
    assert [e["recovered"] for e in events if "recovered" in e] == [True, True]
    assert sorted(e["id"] for e in events if e["type"] == "message") == sorted(missed)
    assert events[-1]["channels"] == {"a": missed[0], "b": missed[1]}
    assert again.last_event_id != cursor
    again.close()

    # One channel: the id is the message id; ?since= and ?last_event_id= do the same.
    last = missed[0]
    for name in ("since", "last_event_id"):
        one = await open_sse(f"{pushd.url}/sse?channel=a&{name}={last}")
        events = await until_live(one)
        assert json.loads(events[0].data)["recovered"] is True
        assert events[-1].last_event_id == last
        last = await pushd.publish("a", "a3")
        assert (await one.next()).last_event_id == last
        one.close()


@pytest_twisted.ensureDeferred
async def test_sse_sends_keepalive_comments(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(keepalive=0.2)
    stream = await open_sse(f"{pushd.url}/sse?channel=quiet")
    await until_live(stream)
    await wait_for(lambda: "keep-alive" in stream.comments, what="a keep-alive comment")
    stream.close()


@pytest_twisted.ensureDeferred
async def test_sse_refusals_and_cors(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(token_secret=SECRET, allowed_origin=("https://app.example",))
    url = f"{pushd.url}/sse?channel=news"

    async def status(query: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        response = await treq.get(
            url + query, headers={k: [v] for k, v in (headers or {}).items()}, persistent=False
        )
        body = await response.json()
        return response.code, body["error"]

    assert await status("") == (401, "token_required")
    assert await status("&token=garbage") == (401, "bad_token")
    assert await status(f"&token={token('a', channels=['other'])}") == (403, "forbidden")
    good = f"&token={token('a', channels=['news'])}"
    assert await status(good, {"Origin": "https://evil.example"}) == (403, "forbidden")
    stream = await open_sse(url + good, {"Origin": "https://app.example"})
    headers = stream.response.headers
    assert headers.getRawHeaders("access-control-allow-origin") == ["https://app.example"]
    assert (await stream.next()).type == "subscribed"
    stream.close()
    preflight = await treq.request(
        "OPTIONS", url, headers={"Origin": ["https://app.example"]}, persistent=False
    )
    assert preflight.code == 204
    assert "Last-Event-ID" in preflight.headers.getRawHeaders("access-control-allow-headers")[0]


class Curl(ProcessProtocol):
    """curl's output, line by line, as it comes; `ended` fires when curl exits."""

    def __init__(self) -> None:
        self.out = b""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def lines(self) -> list[bytes]:
        return [line for line in self.out.split(b"\n")[:-1] if line]

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


@pytest_twisted.ensureDeferred
async def test_ndjson_stream_with_curl(pushd: PushdUnderTest) -> None:
    curl = Curl()
    process = reactor.spawnProcess(  # type: ignore[attr-defined]
        curl, "curl", ["curl", "-sN", "--max-time", "10", f"{pushd.url}/stream?channel=news"]
    )
    await wait_for(lambda: pushd.hub.count("news") == 1, what="curl to subscribe")
    ids = [await pushd.publish("news", {"n": n}) for n in range(3)]
    # The subscription and the three messages, then curl is done (as with ^C).
    await wait_for(lambda: len(curl.lines()) == 4, what="curl to print them")
    process.signalProcess("TERM")
    await with_timeout(curl.ended)
    lines = [json.loads(line) for line in curl.lines()]
    assert lines[0] == {
        "type": "subscribed",
        "channel": "news",
        "recovered": False,
        "position": None,
    }
    assert [(m["id"], m["data"]) for m in lines[1:]] == [(i, {"n": n}) for n, i in enumerate(ids)]
    await wait_for(lambda: pushd.hub.channels() == {}, what="curl's subscription to go")


@pytest_twisted.ensureDeferred
async def test_abandoned_streams_leave_no_subscription(
    pushd: PushdUnderTest, redis_client: object
) -> None:
    clients = []
    for n in range(1000):
        raw = await connect_raw(pushd.port)
        raw.transport.write(f"GET /stream?channel=s{n % 10} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        clients.append(raw)
    for raw in clients:
        await raw.until(b'"subscribed"')
    assert sum(pushd.hub.channels().values()) == 1000
    for n, raw in enumerate(clients):
        if n % 2:
            raw.transport.abortConnection()
        else:
            raw.transport.loseConnection()
    await wait_for(lambda: pushd.hub.channels() == {}, what="every subscription to go")
    assert pushd.service.broker.subscribed_channels() == frozenset()
    gate = pushd.service.listeners[0].factory.ws_factory.gate
    assert len(gate.connections) == 0
    if pushd.cfg.redis:

        async def unsubscribed() -> bool:
            return await channel_subscriptions(redis_client, pushd.cfg.redis_prefix) == []

        await wait_for(unsubscribed, what="Redis subscriptions to go")


@pytest_twisted.ensureDeferred
async def test_a_stream_that_stops_reading_is_cut_off(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(max_send_buffer=65536)
    raw = await connect_raw(pushd.port)
    raw.transport.write(b"GET /stream?channel=flood HTTP/1.1\r\nHost: x\r\n\r\n")
    await raw.until(b'"subscribed"')
    raw.transport.pauseProducing()
    payload = json.dumps({"pad": "x" * 1000}).encode()
    for _ in range(20000):
        await pushd.service.broker.publish("flood", payload)
        await next_turn()  # the hub hands messages out at the end of a reactor turn
        if not pushd.hub.count("flood"):
            break
    assert pushd.hub.count("flood") == 0
    raw.transport.resumeProducing()
    await raw.lost
