"""The store's edges on Redis: history another process wrote is delivered as
strict JSON; reading from the beginning after Redis lost its data."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred

from pushd.broker import Broker, BrokerUnavailable, OutcomeUnknown
from pushd.service import make_broker
from tests.support import PushdUnderTest, RedisServer, wait_for, with_timeout


def strict_loads(text: str) -> Any:
    def refuse(token: str) -> Any:
        raise AssertionError(f"non-JSON token {token} in {text!r}")

    return json.loads(text, parse_constant=refuse)


@pytest_twisted.ensureDeferred
async def test_foreign_history_is_delivered_as_strict_json(
    redis_pushd: PushdUnderTest, redis_client: Any, prefix: str
) -> None:
    """A foreign script XADDs into a channel's stream: what is not strict JSON
    is delivered as its text, JSON over several lines comes on one line."""
    stream = f"{prefix}{{foreign}}:history"
    stored = [
        b'{"x":NaN}',
        b"Infinity",
        b'{"x":1e400}',
        b"not json",
        b'{"a":\n 1}',
        b"\xff\xfe",
        b'{"fine":[1,"two"]}',
    ]
    for data in stored:
        await redis_client.execute_command("XADD", stream, "*", "d", data, "p", "")
    await redis_client.execute_command("XADD", stream, "*", "no-d-field", "x")
    response = await treq.get(
        f"{redis_pushd.url}/channels/foreign/history?since=0-0", persistent=False
    )
    text = (await response.text()).strip()
    assert response.code == 200 and "\n" not in text
    data = [m["data"] for m in strict_loads(text)["messages"]]
    assert data == [
        '{"x":NaN}',
        "Infinity",
        '{"x":1e400}',
        "not json",
        {"a": 1},
        "\ufffd\ufffd",
        {"fine": [1, "two"]},
        None,
    ]
    # A subscriber recovering from the beginning gets the same, framed.
    client = await redis_pushd.connect("?channel=foreign&since=0-0")
    frames = [await client.next() for _ in range(9)]
    assert frames[0]["type"] == "subscribed"
    assert [f["data"] for f in frames[1:]] == data
    await client.close()


async def _broker(server: RedisServer, prefix: str) -> Broker:
    config = PushdUnderTest.config(redis=server.address(), redis_prefix=prefix, redis_timeout=2)
    broker = make_broker(config.cfg, reactor)
    broker.startService()
    await with_timeout(broker.when_ready())
    return broker


@pytest_twisted.ensureDeferred
async def test_from_the_beginning_after_redis_restarted_empty(
    own_redis: RedisServer, prefix: str
) -> None:
    """Redis restarted without its data while pushd ran: every message before
    is gone, and no read says otherwise, "0-0" included."""
    broker = await _broker(own_redis, prefix)
    try:
        before = (await broker.publish("wiped", b"1")).id
        await broker.publish("quiet", b"0")
        assert (await broker.history("quiet", "0-0", None)).complete
        await wait_for(lambda: broker._shards[0].epoch, what="the epoch check")  # type: ignore[attr-defined]
        epoch = broker._shards[0].epoch  # type: ignore[attr-defined]
        own_redis.kill()
        own_redis.start()

        async def published() -> str | None:
            try:
                return (await broker.publish("wiped", b"2")).id
            except (BrokerUnavailable, OutcomeUnknown):
                return None

        await wait_for(published, timeout=20, what="publishing after the restart")
        # Once the node has seen Redis's new epoch, the loss is known everywhere.
        await wait_for(
            lambda: broker._shards[0].epoch not in ("", epoch),  # type: ignore[attr-defined]
            what="the epoch check after the restart",
        )

        async def lost_known() -> bool:
            try:
                return not (await broker.history("quiet", "0-0", None)).complete
            except BrokerUnavailable:  # the command pool reconnects on its own time
                return False

        await wait_for(lost_known, what="the loss to be known")
        quiet = await broker.history("quiet", "0-0", None)
        assert (quiet.messages, quiet.complete, quiet.last) == ([], False, None)
        assert not (await broker.history("wiped", before, None)).complete
        after = (await broker.publish("quiet", b"1")).id
        history = await broker.history("quiet", "0-0", None)
        assert [m for m, _ in history.messages] == [after] and not history.complete
        # A channel that never had a message may have had one before the loss too.
        assert not (await broker.history("never", "0-0", None)).complete
    finally:
        await maybeDeferred(broker.stopService)


@pytest_twisted.ensureDeferred
async def test_a_new_node_on_a_fresh_redis_promises_from_the_beginning(
    own_redis: RedisServer, prefix: str
) -> None:
    broker = await _broker(own_redis, prefix)
    try:
        await wait_for(lambda: broker._shards[0].epoch, what="the epoch check")  # type: ignore[attr-defined]
        assert (await broker.history("fresh", "0-0", None)).complete
        msg_id = (await broker.publish("fresh", b"1")).id
        history = await broker.history("fresh", "0-0", None)
        assert [m for m, _ in history.messages] == [msg_id] and history.complete
    finally:
        await maybeDeferred(broker.stopService)
