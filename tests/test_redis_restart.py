"""Redis goes away and comes back: publishing answers 503 meanwhile and accepts
nothing; subscribers stay connected and receive again once Redis is back."""

from __future__ import annotations

import pytest_twisted

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
    """However many clients and channels: pool-size + 1 connections, one SUBSCRIBE each."""
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
        assert len(listing.strip().splitlines()) == 3 + 1 + 1  # pool, subscriber, this test
        channels = [prefix + c for c in ("ch0", "ch1", "ch2", "ch3", "ch4", "all")]
        counts = await conn.execute_command("PUBSUB", "NUMSUB", *channels)
        assert counts[1::2] == [1] * 6
        for client in clients:
            await client.close()
    finally:
        await conn.disconnect()
        await pushd.stop()
