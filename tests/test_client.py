"""`pushd.client` (Publisher, Subscriber) and `pushd-cli`, against real pushd."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from pushd.client import Publisher, PushdError, Subscriber
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


async def history(url: str, channel: str) -> list[dict[str, Any]]:
    response = await treq.get(f"{url}/channels/{channel}/history", persistent=False)
    assert response.code == 200
    return (await response.json())["messages"]


async def take(subscriber: Subscriber, n: int) -> list[dict[str, Any]]:
    """The next n envelopes of the iteration."""

    async def collect() -> list[dict[str, Any]]:
        return [await subscriber.__anext__() for _ in range(n)]

    return await with_timeout(collect())


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


# -- Publisher


@pytest_twisted.ensureDeferred
async def test_publish_text_json_and_batches(pushd: PushdUnderTest) -> None:
    async with Publisher(pushd.url) as publisher:
        text_id = await publisher.publish("news", "hello")
        json_id = await publisher.publish("news", {"headline": "pushd is up"})
        list_id = await publisher.publish("news", [1, "two"])
        assert [m["id"] for m in await history(pushd.url, "news")] == [text_id, json_id, list_id]
        assert [m["data"] for m in await history(pushd.url, "news")] == [
            "hello",
            {"headline": "pushd is up"},
            [1, "two"],
        ]
        # A repeated Idempotency-Key answers the first id and publishes nothing;
        # the key is bound to its request: on another one it is refused (422).
        first = await publisher.publish("dm#alice,bob", 1, idempotency_key="k-1")
        assert await publisher.publish("dm#alice,bob", 1, idempotency_key="k-1") == first
        with pytest.raises(PushdError) as reused:
            await publisher.publish("dm#alice,bob", 2, idempotency_key="k-1")
        assert (reused.value.status, reused.value.code) == (422, "idempotency_key_reused")
        assert [m["data"] for m in await history(pushd.url, "dm%23alice,bob")] == [1]

        ids = await publisher.publish_batch([("a", 1), ("b", "two"), ("a", {"n": 3})])
        assert len(ids) == 3
        assert [(m["id"], m["data"]) for m in await history(pushd.url, "a")] == [
            (ids[0], 1),
            (ids[2], {"n": 3}),
        ]
        assert [(m["id"], m["data"]) for m in await history(pushd.url, "b")] == [(ids[1], "two")]
        assert await publisher.publish_batch([]) == []

        with pytest.raises(PushdError) as refused:
            await publisher.publish("bad channel", "x")
        assert (refused.value.status, refused.value.code) == (400, "bad_channel")
        with pytest.raises(PushdError) as refused:
            await publisher.publish_batch([("ok", 1), ("bad channel", 2)])
        assert (refused.value.status, refused.value.code) == (400, "bad_channel")
        assert await history(pushd.url, "ok") == []


@pytest_twisted.ensureDeferred
async def test_publish_with_api_keys(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(api_key=("k",))
    for key in (None, "wrong"):
        publisher = Publisher(pushd.url, key)
        with pytest.raises(PushdError) as refused:
            await publisher.publish("news", "x")
        assert (refused.value.status, refused.value.code) == (401, "unauthorized")
        await publisher.close()
    async with Publisher(pushd.url, "k") as publisher:
        msg_id = await publisher.publish("news", "x")
    assert [m["id"] for m in await history_with_key(pushd.url, "news", "k")] == [msg_id]


async def history_with_key(url: str, channel: str, key: str) -> list[dict[str, Any]]:
    response = await treq.get(
        f"{url}/channels/{channel}/history",
        headers={"Authorization": [f"Bearer {key}"]},
        persistent=False,
    )
    return (await response.json())["messages"]


class CountingPublisher(Publisher):
    """Counts the 503s it got."""

    unavailable = 0

    async def _attempt(self, url: str, body: bytes, headers: Any) -> Any:
        try:
            return await super()._attempt(url, body, headers)
        except PushdError as exc:
            self.unavailable += exc.status == 503
            raise


@pytest_twisted.ensureDeferred
async def test_publish_retries_while_redis_is_down(own_redis: RedisServer, prefix: str) -> None:
    pushd = PushdUnderTest.config(redis=own_redis.address(), redis_prefix=prefix, redis_timeout=1)
    await pushd.start()
    publisher = CountingPublisher(pushd.url, retries=30, backoff=0.05, max_backoff=0.3)
    try:
        own_redis.kill()
        single = Deferred.fromCoroutine(publisher.publish("live", "during"))
        batch = Deferred.fromCoroutine(publisher.publish_batch([("live", 1), ("live", 2)]))
        await wait_for(lambda: publisher.unavailable >= 4, what="503s while Redis is down")
        assert not single.called and not batch.called
        own_redis.start()
        msg_id = await with_timeout(single, 20)
        ids = await with_timeout(batch, 20)
        # Published once each, whatever the retries. (Reads wait for the command
        # pool, which reconnects on its own, as the publish connection does.)
        assert pushd.service is not None
        await with_timeout(pushd.service.broker.when_ready(), 20)
        messages = await history(pushd.url, "live")
        assert sorted(m["id"] for m in messages) == sorted([msg_id, *ids])
        assert sorted(map(json.dumps, (m["data"] for m in messages))) == ['"during"', "1", "2"]
    finally:
        await publisher.close()
        await pushd.stop()


@pytest_twisted.ensureDeferred
async def test_publish_gives_up_after_its_retries() -> None:
    from tests.support import free_port

    publisher = Publisher(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.01)
    with pytest.raises(Exception) as failed:
        await publisher.publish("news", "x")
    assert "refused" in repr(failed.value).lower()
    await publisher.close()


# -- Subscriber


@pytest_twisted.ensureDeferred
async def test_subscriber_iterates_and_calls_back(pushd: PushdUnderTest) -> None:
    called: list[dict[str, Any]] = []
    subscriber = Subscriber(pushd.url, ["a", "b"])
    callback_only = Subscriber(pushd.url, "a", on_message=called.append)
    await with_timeout(subscriber.ready())
    await with_timeout(callback_only.ready())
    ids = [
        await pushd.publish("a", 1),
        await pushd.publish("b", {"x": 2}),
        await pushd.publish("a", "three"),
    ]
    got = await take(subscriber, 3)
    assert got == [
        {"type": "message", "channel": "a", "id": ids[0], "data": 1},
        {"type": "message", "channel": "b", "id": ids[1], "data": {"x": 2}},
        {"type": "message", "channel": "a", "id": ids[2], "data": "three"},
    ]
    assert subscriber.last_ids == {"a": ids[2], "b": ids[1]}
    await wait_for(lambda: len(called) == 2, what="the callback")
    assert [m["id"] for m in called] == [ids[0], ids[2]]
    # close() ends the iteration.
    await with_timeout(subscriber.close())
    await with_timeout(callback_only.close())
    with pytest.raises(StopAsyncIteration):
        await subscriber.__anext__()

    # `since` first replays what is retained after it; `async with` and `async for`.
    got = []
    async with Subscriber(pushd.url, ["a", "b"], since=ids[0]) as again:
        async for envelope in again:
            got.append(envelope["id"])
            if len(got) == 2:
                break
    assert sorted(got) == ids[1:]  # each channel in order; no order across channels
    # recovered: a's chain holds ids[0]; b's does not (the server's word on `since`).
    assert again.recovered == {"a": True, "b": False}

    # A `since` per channel (sent in subscribe frames); a channel without one is live.
    async with Subscriber(pushd.url, ["a", "b"], since={"a": ids[0], "b": ids[1]}) as per:
        assert (await take(per, 1))[0]["id"] == ids[2]
        assert per.recovered == {"a": True, "b": True}
        live = await pushd.publish("b", 4)
        assert (await take(per, 1))[0]["id"] == live


@pytest_twisted.ensureDeferred
async def test_subscriber_resumes_across_a_node_restart(
    redis_pushd: PushdUnderTest, redis_server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    """The node a Subscriber is on stops (1001) and starts again while messages are
    published elsewhere: the Subscriber gets every one once, in order."""
    redis = ("--redis", f"redis://127.0.0.1:{redis_server.port}", "--redis-prefix", prefix)
    node = Node(tmp_path, *redis, "--shutdown-timeout", "2")
    node.start()
    subscriber = Subscriber(node.url, ["r", "s"], backoff=0.05, max_backoff=0.3)
    try:
        await node.ready()
        await with_timeout(subscriber.ready())
        publisher = Publisher(redis_pushd.url)
        sent: list[str] = []

        async def publish(n: int) -> None:
            for _ in range(n):
                sent.append(await publisher.publish("r" if len(sent) % 3 else "s", len(sent)))

        await publish(5)
        node.kill(signal.SIGTERM)  # 1001 to the subscriber
        await publish(5)  # while the node is down
        node.start()
        await publish(5)  # while it starts
        await node.ready()
        await wait_for(lambda: subscriber.connections >= 2, what="the subscriber to reconnect")
        await publish(5)
        got = await take(subscriber, len(sent))
        # Every message once, each channel's in order (a replay goes channel by channel).
        for channel in ("r", "s"):
            numbers = [n for n in range(len(sent)) if ("r" if n % 3 else "s") == channel]
            mine = [m for m in got if m["channel"] == channel]
            assert [m["data"] for m in mine] == numbers
            assert [m["id"] for m in mine] == [sent[n] for n in numbers]
        assert subscriber.recovered == {"r": True, "s": True}
        await publisher.close()
        await with_timeout(subscriber.close())
        await subscriber.done
    finally:
        subscriber.close()
        node.stop()


@pytest_twisted.ensureDeferred
async def test_subscriber_resumes_a_quiet_channel_across_a_node_restart(
    redis_pushd: PushdUnderTest, redis_server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    """A channel that delivered nothing yet is resumed from its position: a
    message published to it while the node is down comes once."""
    redis = ("--redis", f"redis://127.0.0.1:{redis_server.port}", "--redis-prefix", prefix)
    node = Node(tmp_path, *redis, "--shutdown-timeout", "2")
    node.start()
    old = await redis_pushd.publish("kept", "before")
    subscriber = Subscriber(node.url, ["quiet", "kept"], backoff=0.05, max_backoff=0.3)
    try:
        await node.ready()
        await with_timeout(subscriber.ready())
        assert subscriber.last_ids == {"quiet": "0-0", "kept": old}
        node.kill(signal.SIGTERM)
        missed = await redis_pushd.publish("quiet", "while down")
        node.start()
        await node.ready()
        await wait_for(lambda: subscriber.connections >= 2, what="the subscriber to reconnect")
        assert [(m["id"], m["data"]) for m in await take(subscriber, 1)] == [(missed, "while down")]
        live = await redis_pushd.publish("kept", "after")
        assert [m["id"] for m in await take(subscriber, 1)] == [live]
        assert subscriber.recovered == {"quiet": True, "kept": True}
        assert subscriber.last_ids == {"quiet": missed, "kept": live}
        await with_timeout(subscriber.close())
    finally:
        subscriber.close()
        node.stop()


def test_subscriber_takes_positions_as_resume_points() -> None:
    """Quiet channels resume from pushd's position ("0-0" without history), a
    `since` ahead of the channel from its newest id; a resume point behind the
    position stays (the replay up to it may not have arrived)."""
    subscriber = Subscriber(
        "http://127.0.0.1:1", ["quiet", "busy", "ahead", "behind"], since={
            "ahead": "9999999999999-0", "behind": "5-0"
        }
    )  # fmt: skip
    for channel, position in [
        ("quiet", None),
        ("busy", "7-0"),
        ("ahead", "8-0"),
        ("behind", "9-0"),
    ]:
        subscriber._frame(
            {"type": "subscribed", "channel": channel, "recovered": False, "position": position}
        )
    assert subscriber.last_ids == {"quiet": "0-0", "busy": "7-0", "ahead": "8-0", "behind": "5-0"}
    # A replayed message moves it on; an older pushd without positions changes nothing.
    subscriber._frame({"type": "message", "channel": "behind", "id": "6-0", "data": 1})
    subscriber._frame({"type": "subscribed", "channel": "busy", "recovered": True})
    assert subscriber.last_ids["behind"] == "6-0" and subscriber.last_ids["busy"] == "7-0"
    # A message another process PUBLISHed into Redis has no id: it moves nothing.
    subscriber._frame({"type": "message", "channel": "quiet", "id": None, "data": "foreign"})
    assert subscriber.last_ids["quiet"] == "0-0"


class ScriptedServer(WebSocketServerProtocol):
    """Answers each connection with a subscribed frame, one message, then a close code."""

    factory: Any

    def onConnect(self, request: Any) -> None:
        self.factory.queries.append(request.params)

    def onOpen(self) -> None:
        n = len(self.factory.queries)
        for channel in self.factory.channels:
            self.sendMessage(json.dumps({"type": "subscribed", "channel": channel}).encode())
        # A message delivered before (a duplicate), then a new one.
        for i in (n - 1, n):
            frame = {"type": "message", "channel": "x", "id": f"{i}-0", "data": i}
            self.sendMessage(json.dumps(frame).encode())
        code = self.factory.codes[min(n, len(self.factory.codes)) - 1]
        if code == 1001:  # sendClose() refuses 1001, a server's code
            self.sendCloseFrame(code, b"going away")
        else:
            self.sendClose(code, f"code {code}")


@pytest.fixture
def scripted() -> Iterator[WebSocketServerFactory]:
    factory = WebSocketServerFactory(reactor=reactor)
    factory.protocol = ScriptedServer
    factory.queries = []
    factory.channels = ["x"]
    factory.codes = [4008, 1001, 4003]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.url = f"http://127.0.0.1:{port.getHost().port}"
    yield factory
    port.stopListening()


@pytest_twisted.ensureDeferred
async def test_reconnects_with_since_and_stops_on_4003(scripted: Any) -> None:
    subscriber = Subscriber(scripted.url, "x", backoff=0.01, max_backoff=0.05)
    got = [m async for m in subscriber]  # ends on 4003
    assert [m["id"] for m in got] == ["0-0", "1-0", "2-0", "3-0"]  # no duplicate
    assert (subscriber.close_code, subscriber.close_reason) == (4003, "code 4003")
    assert subscriber.connections == 3
    assert [q.get("since") for q in scripted.queries] == [None, ["1-0"], ["2-0"]]
    await sleep(0.2)
    assert len(scripted.queries) == 3  # 4003: never again
    await with_timeout(subscriber.done)


@pytest_twisted.ensureDeferred
async def test_tokens_refused_and_expiring() -> None:
    pushd = PushdUnderTest.config(token_secret=SECRET)
    await pushd.start()
    try:
        # Refused at the handshake: not retried.
        anonymous = Subscriber(pushd.url, "news")
        with pytest.raises(PushdError) as refused:
            await with_timeout(anonymous.__anext__())
        assert refused.value.status == 401

        # A fixed token that expires: 4001 ends the subscriber.
        fixed = Subscriber(pushd.url, "news", token=token(channels=["*"], ttl=1))
        await with_timeout(fixed.ready())
        with pytest.raises(PushdError) as expired:
            await with_timeout(fixed.__anext__(), 5)
        assert (expired.value.status, expired.value.code) == (401, "token_expired")

        # A token callable: asked again after 4001, and the subscription resumes.
        issued: list[str] = []

        def fresh() -> str:
            issued.append(token(channels=["news"], ttl=1 if not issued else 3600))
            return issued[-1]

        renewing = Subscriber(pushd.url, "news", token=fresh, backoff=0.01)
        await with_timeout(renewing.ready())
        first = await pushd.publish("news", 1)
        await wait_for(lambda: len(issued) == 2, what="a second token")
        await with_timeout(renewing.ready())
        second = await pushd.publish("news", 2)
        assert [m["id"] for m in await take(renewing, 2)] == [first, second]
        await with_timeout(renewing.close())
    finally:
        await pushd.stop()


# -- the command line: `python -m pushd.client.cli` against `twistd -n pushd`


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    node = Node(tmp_path)
    node.start()
    yield node
    node.stop()


async def cli(*argv: str) -> tuple[int, str, str]:
    out, err, code = await with_timeout(
        getProcessOutputAndValue(
            sys.executable, ["-m", "pushd.client.cli", *argv], env=dict(os.environ)
        ),
        30,
    )
    return code, out.decode(), err.decode()


@pytest_twisted.ensureDeferred
async def test_the_command_line(node: Node) -> None:
    await node.ready()
    subscribing = Deferred.fromCoroutine(
        cli("subscribe", "a", "b", "--count", "2", "--url", node.url)
    )

    async def subscribed() -> bool:
        response = await treq.get(f"{node.url}/channels/b", persistent=False)
        return (await response.json())["subscribers"] == 1

    await wait_for(subscribed, timeout=20, what="pushd-cli subscribe")
    code, out, err = await cli("publish", "a", "hello", "--url", node.url)
    assert (code, err) == (0, ""), out + err
    first = out.strip()
    code, out, err = await cli("publish", "b", '{"n": 2}', "--json", "--url", node.url)
    assert (code, err) == (0, ""), out + err
    second = out.strip()

    code, out, err = await with_timeout(subscribing, 30)
    assert (code, err) == (0, ""), out + err
    assert [json.loads(line) for line in out.splitlines()] == [
        {"type": "message", "channel": "a", "id": first, "data": "hello"},
        {"type": "message", "channel": "b", "id": second, "data": {"n": 2}},
    ]
    # --since replays the history; errors are one line.
    code, out, _ = await cli("subscribe", "a", "--since", "0-0", "--count", "1", "--url", node.url)
    assert (code, json.loads(out)["id"]) == (0, first)
    code, out, err = await cli("publish", "b", "{", "--json", "--url", node.url)
    assert (code, out) == (1, "") and err.startswith("pushd-cli: DATA is not JSON"), err
    code, _, err = await cli("publish", "bad channel", "x")
    assert code == 2 and "usage: pushd-cli" in err


@pytest_twisted.ensureDeferred
async def test_the_command_line_resumes_a_quiet_channel_across_a_restart(
    redis_pushd: PushdUnderTest, redis_server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    redis = ("--redis", f"redis://127.0.0.1:{redis_server.port}", "--redis-prefix", prefix)
    node = Node(tmp_path, *redis, "--shutdown-timeout", "2")
    node.start()
    try:
        await node.ready()
        subscribing = Deferred.fromCoroutine(
            cli("subscribe", "hush", "--count", "1", "--url", node.url)
        )

        async def subscribed() -> bool:
            response = await treq.get(f"{node.url}/channels/hush", persistent=False)
            return (await response.json())["subscribers"] == 1

        await wait_for(subscribed, timeout=20, what="pushd-cli subscribe")
        node.kill(signal.SIGTERM)
        missed = await redis_pushd.publish("hush", "while down")
        node.start()
        code, out, err = await with_timeout(subscribing, 30)
        assert (code, err) == (0, ""), out + err
        assert [json.loads(line) for line in out.splitlines()] == [
            {"type": "message", "channel": "hush", "id": missed, "data": "while down"}
        ]
    finally:
        node.stop()
