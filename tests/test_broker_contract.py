"""One contract, two brokers: what the hub and the producer API rely on."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred

from pushd.broker import Broker
from pushd.message import dump_json, parse_id
from pushd.service import make_broker
from tests.support import PushdUnderTest, RedisServer, wait_for, with_timeout


@pytest_twisted.async_yield_fixture
async def broker(broker_kind: str, redis_server: RedisServer, prefix: str) -> AsyncIterator[Broker]:
    config = PushdUnderTest.config(
        redis=redis_server.address() if broker_kind == "redis" else None,
        redis_prefix=prefix,
        history_size=10,
    ).cfg
    broker = make_broker(config, reactor)
    broker.startService()
    await with_timeout(broker.when_ready())
    yield broker
    await maybeDeferred(broker.stopService)


class Recorder:
    def __init__(self, broker: Broker) -> None:
        self.got: list[tuple[str, dict]] = []
        broker.listener = self

    def __call__(self, channel: str, raw: bytes) -> None:
        self.got.append((channel, json.loads(raw)))


@pytest_twisted.ensureDeferred
async def test_publish_answers_increasing_ids(broker: Broker) -> None:
    ids = [(await broker.publish("c", dump_json(n))).id for n in range(30)]
    keys = [parse_id(i) for i in ids]
    assert keys == sorted(keys) and len(set(keys)) == 30
    # Another channel has its own sequence; ids never go backwards either.
    other = parse_id((await broker.publish("d", b"1")).id)
    assert other >= (keys[0][0], 0)


@pytest_twisted.ensureDeferred
async def test_subscribed_channels_reach_the_listener(broker: Broker) -> None:
    recorder = Recorder(broker)
    await with_timeout(broker.subscribe("c"))
    await with_timeout(broker.subscribe("c"))  # idempotent
    assert broker.subscribed_channels() == {"c"}
    msg_id = (await broker.publish("c", b'{"x":1}')).id
    await broker.publish("not-subscribed", b"2")
    await wait_for(lambda: recorder.got, what="the message")
    assert recorder.got == [
        ("c", {"type": "message", "channel": "c", "id": msg_id, "data": {"x": 1}})
    ]

    broker.unsubscribe("c")
    assert broker.subscribed_channels() == frozenset()
    await broker.publish("c", b"3")
    # A message on a channel still subscribed proves the bus has moved past "3".
    await with_timeout(broker.subscribe("marker"))
    await broker.publish("marker", b"4")
    await wait_for(lambda: len(recorder.got) == 2, what="the marker")
    assert recorder.got[1][0] == "marker"


@pytest_twisted.ensureDeferred
async def test_messages_keep_publish_order(broker: Broker) -> None:
    recorder = Recorder(broker)
    await with_timeout(broker.subscribe("order"))
    ids = [(await broker.publish("order", dump_json(n))).id for n in range(100)]
    await wait_for(lambda: len(recorder.got) == 100, what="100 messages")
    assert [m["id"] for _, m in recorder.got] == ids
    assert [m["data"] for _, m in recorder.got] == list(range(100))
