"""Redis goes away and comes back: publishing answers 503 meanwhile and accepts
nothing; subscribers stay connected and receive again once Redis is back."""

from __future__ import annotations

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.support import PushdUnderTest, RedisServer, wait_for


@pytest_twisted.ensureDeferred
async def test_redis_restart(own_redis: RedisServer, prefix: str) -> None:
    import txredisapi

    pushd = PushdUnderTest.config(redis=own_redis.address(), redis_prefix=prefix, redis_timeout=2)
    await pushd.start()
    try:
        client = await pushd.connect("?channel=live&channel=other")
        for _ in range(2):
            await client.next_of("subscribed")
        await pushd.publish("live", "before")
        assert (await client.next_of("message"))["data"] == "before"

        own_redis.kill()

        async def refused() -> bool:
            response = await pushd.post("live", "during")
            if response.code == 200:
                return False
            body = await response.json()
            assert (response.code, body["error"]) == (503, "unavailable"), body
            return True

        await wait_for(refused, what="publishing to answer 503")
        for n in range(5):
            response = await pushd.post("live", f"during {n}")
            assert response.code == 503

        own_redis.start()

        async def resubscribed() -> bool:
            conn = await txredisapi.Connection("127.0.0.1", own_redis.port)
            try:
                counts = await conn.execute_command(
                    "PUBSUB", "NUMSUB", prefix + "live", prefix + "other"
                )
            finally:
                await conn.disconnect()
            return counts[1] == 1 and counts[3] == 1

        await wait_for(resubscribed, timeout=20, what="pushd to subscribe again")

        async def accepted() -> bool:
            return (await pushd.post("live", "after")).code == 200

        await wait_for(accepted, timeout=20, what="publishing to resume")
        frame = await client.next_of("message")
        # Nothing refused during the outage was published later.
        assert frame["data"] == "after"
        await pushd.publish("other", "also")
        assert (await client.next_of("message"))["data"] == "also"
        assert not client.closed.called
        await client.nothing_more()
        await client.close()
    finally:
        await pushd.stop()


@pytest_twisted.ensureDeferred
async def test_one_pool_and_one_subscriber_connection(own_redis: RedisServer, prefix: str) -> None:
    """However many clients and channels: the pool's connections, one publish
    connection (named for the node) and one subscriber connection, with one
    SUBSCRIBE a channel."""
    import txredisapi

    pushd = PushdUnderTest.config(redis=own_redis.address(), redis_prefix=prefix, redis_pool_size=3)
    await pushd.start()
    conn = await txredisapi.Connection("127.0.0.1", own_redis.port)
    try:
        clients = [await pushd.connect(f"?channel=ch{n % 5}&channel=all") for n in range(20)]
        for client in clients:
            for _ in range(2):
                await client.next_of("subscribed")
        listing = await conn.execute_command("CLIENT", "LIST")
        lines = listing.strip().splitlines()
        assert len(lines) == 3 + 1 + 1 + 1  # pool, publish, subscriber, this test
        assert len([line for line in lines if " name=pushd-publish-" in line]) == 1
        assert len([line for line in lines if " sub=0 " not in line]) == 1
        channels = [prefix + c for c in ("ch0", "ch1", "ch2", "ch3", "ch4", "all")]
        counts = await conn.execute_command("PUBSUB", "NUMSUB", *channels)
        assert counts[1::2] == [1] * 6
        for client in clients:
            await client.close()
    finally:
        await conn.disconnect()
        await pushd.stop()


@pytest_twisted.ensureDeferred
async def test_outage_loses_nothing_that_was_accepted(
    durable_redis: RedisServer, prefix: str
) -> None:
    """A producer retries with Idempotency-Key across a Redis crash: the history
    holds exactly the accepted messages, and a subscriber that stayed connected
    has every one of them once, in order."""
    pushd = PushdUnderTest.config(redis=durable_redis.address(), redis_prefix=prefix)
    await pushd.start()
    try:
        client = await pushd.connect("?channel=feed")
        await client.next_of("subscribed")
        accepted: list[str] = []
        refused = 0

        async def publish(n: int) -> None:
            nonlocal refused
            while True:
                response = await pushd.post(
                    "feed", str(n), headers={"idempotency-key": [f"{prefix}{n}"]}
                )
                if response.code == 200:
                    accepted.append((await response.json())["id"])
                    return
                # 504: sent as Redis died, outcome unknown; the key settles it.
                assert response.code in (503, 504)
                refused += 1
                await deferLater(reactor, 0.02, lambda: None)

        for n in range(20):
            await publish(n)
        durable_redis.kill()
        restart = deferLater(reactor, 0.5, durable_redis.start)
        for n in range(20, 40):
            await publish(n)
        await restart
        assert refused > 0
        assert not client.closed.called

        # Still connected, the client got every message, the ones published
        # before pushd had subscribed again included: pushd filled the gap.
        live = [(await client.next_of("message"))["id"] for _ in range(40)]
        assert live == accepted
        await client.nothing_more()
        # Re-subscribing with an id from before the outage recovers the rest.
        client.send({"type": "unsubscribe", "channel": "feed"})
        await client.next_of("unsubscribed")
        client.send({"type": "subscribe", "channel": "feed", "since": accepted[19]})
        assert (await client.next_of("subscribed"))["recovered"] is True
        replay = [(await client.next_of("message"))["id"] for _ in range(20)]
        assert replay == accepted[20:]
        await client.nothing_more()

        response = await treq.get(f"{pushd.url}/channels/feed/history", persistent=False)
        assert [m["id"] for m in (await response.json())["messages"]] == accepted
        await client.close()
    finally:
        await pushd.stop()
