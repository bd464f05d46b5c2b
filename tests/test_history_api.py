"""GET /channels/{channel}/history, GET /channels/{channel}, Idempotency-Key."""

from __future__ import annotations

from typing import Any

import pytest_twisted
import treq

from tests.support import PushdUnderTest, wait_for


async def get(pushd: PushdUnderTest, path: str) -> tuple[int, Any]:
    response = await treq.get(f"{pushd.url}{path}", persistent=False)
    return response.code, await response.json()


@pytest_twisted.ensureDeferred
async def test_history_oldest_first_with_since_and_limit(pushd: PushdUnderTest) -> None:
    ids = [await pushd.publish("news", {"n": n}) for n in range(10)]
    code, body = await get(pushd, "/channels/news/history")
    assert code == 200
    assert body["messages"] == [
        {"type": "message", "channel": "news", "id": i, "data": {"n": n}} for n, i in enumerate(ids)
    ]
    code, body = await get(pushd, "/channels/news/history?limit=3")
    assert [m["id"] for m in body["messages"]] == ids[-3:]
    code, body = await get(pushd, f"/channels/news/history?since={ids[4]}&limit=2")
    assert [m["id"] for m in body["messages"]] == ids[5:7]
    code, body = await get(pushd, f"/channels/news/history?since={ids[-1]}")
    assert body == {"messages": []}
    code, body = await get(pushd, "/channels/never/history")
    assert (code, body) == (200, {"messages": []})


@pytest_twisted.ensureDeferred
async def test_history_bad_parameters(pushd: PushdUnderTest) -> None:
    for query, error in [
        ("since=yesterday", "bad_since"),
        ("since=1-2-3", "bad_since"),
        ("limit=0", "bad_limit"),
        ("limit=-1", "bad_limit"),
        ("limit=many", "bad_limit"),
        ("limit=10001", "bad_limit"),
    ]:
        code, body = await get(pushd, f"/channels/news/history?{query}")
        assert (code, body["error"]) == (400, error), query
    code, body = await get(pushd, "/channels/bad%20name/history")
    assert (code, body["error"]) == (400, "bad_channel")
    code, body = await get(pushd, "/channels/news/history/more")
    assert (code, body["error"]) == (404, "not_found")


@pytest_twisted.ensureDeferred
async def test_channel_info(pushd: PushdUnderTest) -> None:
    code, body = await get(pushd, "/channels/news")
    assert (code, body) == (200, {"channel": "news", "last_id": None, "subscribers": 0})
    clients = [await pushd.connect("?channel=news") for _ in range(3)]
    for client in clients:
        await client.next_of("subscribed")
    last = await pushd.publish("news", "x")

    async def counted() -> bool:
        return (await get(pushd, "/channels/news"))[1] == {
            "channel": "news",
            "last_id": last,
            "subscribers": 3,
        }

    await wait_for(counted, what="3 subscribers to be counted")
    await clients[0].close()

    async def two() -> bool:
        return (await get(pushd, "/channels/news"))[1]["subscribers"] == 2

    await wait_for(two, what="2 subscribers to be counted")
    for client in clients[1:]:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_idempotency_key(pushd: PushdUnderTest) -> None:
    client = await pushd.connect("?channel=news")
    await client.next_of("subscribed")
    headers = {"idempotency-key": ["order-42"]}
    first = await pushd.post("news", "once", headers=headers)
    again = await pushd.post("news", "once", headers=headers)
    assert first.code == again.code == 200
    assert await first.json() == await again.json()
    other = await pushd.post("news", "twice", headers={"idempotency-key": ["order-43"]})
    assert (await other.json())["id"] != (await first.json())["id"]
    assert (await client.next_of("message"))["data"] == "once"
    assert (await client.next_of("message"))["data"] == "twice"
    await client.nothing_more()
    _, body = await get(pushd, "/channels/news/history")
    assert [m["data"] for m in body["messages"]] == ["once", "twice"]
    bad = await pushd.post("news", "x", headers={"idempotency-key": ["x" * 300]})
    assert (bad.code, (await bad.json())["error"]) == (400, "bad_idempotency_key")
    await client.close()


@pytest_twisted.ensureDeferred
async def test_publishing_survives_a_script_flush(
    redis_pushd: PushdUnderTest, redis_client
) -> None:  # type: ignore[no-untyped-def]
    """EVALSHA after Redis forgot the script (NOSCRIPT): loaded again, transparently."""
    await redis_pushd.publish("news", 1)
    await redis_client.execute_command("SCRIPT", "FLUSH")
    for n in range(3):
        await redis_pushd.publish("news", n)
    _, body = await get(redis_pushd, "/channels/news/history")
    assert [m["data"] for m in body["messages"]] == [1, 0, 1, 2]
