"""One contract, three brokers (memory, Redis, 3 Redis shards): what the hub
and the producer API rely on."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred

from pushd.broker import Broker, IdempotencyKeyReused, NoClients
from pushd.broker.redis.address import RedisAddress
from pushd.message import Message, dump_json, parse_id
from pushd.service import make_broker
from tests.support import PushdUnderTest, wait_for, with_timeout


@pytest_twisted.async_yield_fixture
async def broker(broker_redis: tuple[RedisAddress, ...], prefix: str) -> AsyncIterator[Broker]:
    config = PushdUnderTest.config(
        redis=broker_redis,
        redis_prefix=prefix,
        history_size=10,
    ).cfg
    broker = make_broker(config, reactor)
    broker.startService()
    await with_timeout(broker.when_ready())
    yield broker
    await maybeDeferred(broker.stopService)


class Recorder(NoClients):
    """A BusListener that records what the bus brings and has no clients."""

    def __init__(self, broker: Broker) -> None:
        self.got: list[tuple[str, dict]] = []
        self.errors: list[tuple[str, str]] = []
        broker.attach(self)

    def receive(self, channel: str, payload: bytes) -> None:
        # A bus payload: pushd's format (one envelope a line after the marker).
        for message in Message.from_bus(channel, payload):
            assert message.id is not None, payload
            self.got.append((channel, json.loads(message.payload)))

    def bus_error(self, stage: str, channel: str) -> None:
        self.errors.append((stage, channel))


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


# -- history: `last`, reading from the beginning, `since` ahead, idempotency


async def _started(redis: tuple[RedisAddress, ...], prefix: str, **cfg: Any) -> Broker:
    config = PushdUnderTest.config(
        redis=redis,
        redis_prefix=prefix,
        **cfg,
    ).cfg
    broker = make_broker(config, reactor)
    broker.startService()
    await with_timeout(broker.when_ready())
    return broker


@pytest_twisted.ensureDeferred
async def test_history_says_the_newest_id(broker: Broker) -> None:
    empty = await broker.history("h", None, None)
    assert (empty.messages, empty.last) == ([], None)
    ids = [(await broker.publish("h", dump_json(n))).id for n in range(3)]
    newest = await broker.history("h", None, 2)
    assert [m for m, _ in newest.messages] == ids[1:] and newest.last == ids[2]
    after = await broker.history("h", ids[0], 1)
    assert [m for m, _ in after.messages] == ids[1:2]
    assert after.complete and after.last == ids[2]
    at_end = await broker.history("h", ids[2], None)
    assert (at_end.messages, at_end.complete, at_end.last) == ([], True, ids[2])


@pytest_twisted.ensureDeferred
async def test_since_ahead_of_the_channel_is_not_complete(broker: Broker) -> None:
    msg_id = (await broker.publish("ahead", b"1")).id
    ms, seq = parse_id(msg_id)
    for since in (f"{ms}-{seq + 1}", f"{ms + 10_000_000}-0"):
        history = await broker.history("ahead", since, None)
        assert (history.messages, history.complete, history.last) == ([], False, msg_id)
    # A channel with no history: `last` None, not complete either.
    nothing = await broker.history("never", "1700000000000-0", None)
    assert (nothing.messages, nothing.complete, nothing.last) == ([], False, None)


@pytest_twisted.ensureDeferred
async def test_from_the_beginning(broker: Broker) -> None:
    """since=0-0: every retained message; complete while nothing was trimmed."""
    assert (await broker.history("new", "0-0", None)).complete  # nothing ever published
    ids = [(await broker.publish("new", dump_json(n))).id for n in range(5)]
    history = await broker.history("new", "0-0", None)
    assert [m for m, _ in history.messages] == ids
    assert history.complete and history.last == ids[-1]
    # A batch links its messages too, whichever channels it interleaves.
    published = await broker.publish_many([("b1", b"1"), ("b2", b"2"), ("b1", b"3")])
    b1 = await broker.history("b1", "0-0", None)
    assert [m for m, _ in b1.messages] == [published[0].id, published[2].id] and b1.complete
    # Trimmed (history_size 10; Redis trims MAXLEN ~ a whole node of 100 at a time).
    ids = [(await broker.publish("trimmed", dump_json(n))).id for n in range(250)]
    history = await broker.history("trimmed", "0-0", 1000)
    assert 10 <= len(history.messages) < 250
    assert [m for m, _ in history.messages] == ids[-len(history.messages) :]
    assert not history.complete and history.last == ids[-1]


@pytest_twisted.ensureDeferred
async def test_from_the_beginning_after_the_history_expired(
    broker_redis: tuple[RedisAddress, ...], prefix: str
) -> None:
    broker = await _started(broker_redis, prefix, history_ttl=1)
    try:
        first = (await broker.publish("exp", b"1")).id
        await broker.publish_many([("exp-batch", b"1")])
        assert (await broker.history("exp", "0-0", None)).complete
        assert (await broker.history("exp-batch", "0-0", None)).complete

        async def expired() -> bool:
            for channel in ("exp", "exp-batch"):
                if (await broker.history(channel, None, None)).last is not None:
                    return False
            return True

        await wait_for(expired, timeout=5, what="the history to expire")
        gone = await broker.history("exp", "0-0", None)
        assert (gone.messages, gone.complete, gone.last) == ([], False, None)
        second = (await broker.publish("exp", b"2")).id
        batch = await broker.publish_many([("exp-batch", b"2"), ("exp-batch", b"3")])
        history = await broker.history("exp-batch", "0-0", None)
        assert [m for m, _ in history.messages] == [p.id for p in batch]
        assert not history.complete
        again = await broker.history("exp", "0-0", None)
        assert [m for m, _ in again.messages] == [second] and not again.complete
        # The new message links to the one that expired: nothing after it is missing.
        resumed = await broker.history("exp", first, None)
        assert [m for m, _ in resumed.messages] == [second] and resumed.complete
        # `destroy` drops the history: nothing from before it resumes completely,
        # nor "0-0", and ids stay above the destroyed ones, even within a millisecond.
        await broker.control({"cmd": "destroy", "channel": "exp"})
        assert not (await broker.history("exp", "0-0", None)).complete
        third = (await broker.publish("exp", b"3")).id
        assert parse_id(third) > parse_id(second)
        after = await broker.history("exp", "0-0", None)
        assert [m for m, _ in after.messages] == [third] and not after.complete
        assert not (await broker.history("exp", second, None)).complete
        assert not (await broker.history("exp", first, None)).complete
        fourth = (await broker.publish("exp", b"4")).id
        assert (await broker.history("exp", third, None)).complete
        assert parse_id(fourth) > parse_id(third)
        for n in range(20):
            last = (await broker.publish("fast", dump_json(n))).id
            await broker.control({"cmd": "destroy", "channel": "fast"})
            assert parse_id((await broker.publish("fast", b"0")).id) > parse_id(last)
    finally:
        await maybeDeferred(broker.stopService)


@pytest_twisted.ensureDeferred
async def test_an_idempotency_key_is_bound_to_its_request(broker: Broker) -> None:
    first = await broker.publish("idem", b'{"n":1}', "k1")
    again = await broker.publish("idem", b'{"n":1}', "k1")
    assert (again.id, first.repeated, again.repeated) == (first.id, False, True)
    for other in (
        broker.publish("idem", b'{"n":2}', "k1"),  # another body
        broker.publish_many([("idem", b'{"n":1}')], "k1"),  # a batch
    ):
        with pytest.raises(IdempotencyKeyReused):
            await other
    history = await broker.history("idem", "0-0", None)
    assert history.messages == [(first.id, b'{"n":1}')]

    # A batch's key covers the batch as a whole, and never meets a single
    # publish's key: "K" for a batch and "K#1" for a single publish are two keys.
    items = [("idem-b", b"1"), ("idem-c", b"2")]
    batch = await broker.publish_many(items, "K")
    single = await broker.publish("idem-b", b"2", "K#1")
    # (Ids are a channel's own: idem-c's may equal this one.)
    assert not single.repeated and single.id != batch[0].id
    repeat = await broker.publish_many(items, "K")
    assert [p.id for p in repeat] == [p.id for p in batch] and all(p.repeated for p in repeat)
    for other_batch in (items[:1], [*items, ("idem-b", b"3")], items[::-1]):
        with pytest.raises(IdempotencyKeyReused):
            await broker.publish_many(other_batch, "K")
    with pytest.raises(IdempotencyKeyReused):
        await broker.publish("idem-b", b"1", "K")
    assert len((await broker.history("idem-b", None, None)).messages) == 2
    assert len((await broker.history("idem-c", None, None)).messages) == 1


@pytest_twisted.ensureDeferred
async def test_an_idempotency_key_is_bound_to_its_channel(broker: Broker) -> None:
    """On shards too: "idem" and "idem2" live on two shards, and the key is
    bound to its first request on the key's own shard."""
    await broker.publish("idem", b'{"n":1}', "k1")
    with pytest.raises(IdempotencyKeyReused):
        await broker.publish("idem2", b'{"n":1}', "k1")
    assert (await broker.history("idem2", None, None)).messages == []
    with pytest.raises(IdempotencyKeyReused):
        await broker.publish_many([("idem2", b"1"), ("idem3", b"2")], "k1")
    assert (await broker.history("idem2", None, None)).messages == []
    assert (await broker.history("idem3", None, None)).messages == []
