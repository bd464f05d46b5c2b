"""Producers' other ways in: a batch, the nginx+Lua gateway's /push, and Redis itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from tests.support import PushdUnderTest, RedisServer

PUBLISH_LUA = Path(__file__).parent.parent / "pushd" / "broker" / "redis" / "publish.lua"


async def run(*argv: str) -> tuple[str, int]:
    out, err, code = await getProcessOutputAndValue(argv[0], argv[1:], reactor=reactor)
    return (out + err).decode(), code


@pytest_twisted.ensureDeferred
async def test_batch_one_message_to_many_channels(pushd: PushdUnderTest) -> None:
    client = await pushd.connect("?channel=a&channel=b")
    for _ in range(2):
        await client.next_of("subscribed")
    response = await treq.post(
        f"{pushd.url}/publish",
        json.dumps({"channels": ["a", "b"], "data": {"x": 1}}).encode(),
        headers={"content-type": ["application/json"]},
        persistent=False,
    )
    results = (await response.json())["results"]
    assert [r["channel"] for r in results] == ["a", "b"]
    got = {(f["channel"], f["id"]) for f in [await client.next_of("message") for _ in range(2)]}
    assert got == {(r["channel"], r["id"]) for r in results}
    await client.close()


@pytest_twisted.ensureDeferred
async def test_batch_ndjson_in_order_all_or_nothing(pushd: PushdUnderTest) -> None:
    client = await pushd.connect("?channel=feed")
    await client.next_of("subscribed")
    lines = [{"channel": "feed", "data": n} for n in range(100)]
    lines.append({"channels": ["feed", "other"], "data": "both"})
    body = "\n".join(json.dumps(line) for line in lines).encode()

    async def post(body: bytes, key: str | None = None) -> Any:
        headers = {"content-type": ["application/x-ndjson"]}
        if key is not None:
            headers["idempotency-key"] = [key]
        return await treq.post(f"{pushd.url}/publish", body, headers=headers, persistent=False)

    response = await post(body)
    results = (await response.json())["results"]
    assert len(results) == 102
    got = [await client.next_of("message") for _ in range(101)]
    assert [f["data"] for f in got] == [*range(100), "both"]
    assert [f["id"] for f in got] == [r["id"] for r in results if r["channel"] == "feed"]

    for bad, code in [
        (body + b'\n{"channel": "feed"}', "bad_batch"),
        (body + b"\n{oops", "bad_json"),
        (body + b'\n{"channel": "bad name", "data": 1}', "bad_channel"),
        (b"", "bad_batch"),
    ]:
        response = await post(bad)
        assert (response.code, (await response.json())["error"]) == (400, code)
    await client.nothing_more()  # nothing of a refused batch was published

    retried = [await post(b'{"channel":"feed","data":1}', key="b1") for _ in "xy"]
    answers = [await r.json() for r in retried]
    assert answers[0] == answers[1]
    await client.next_of("message")
    await client.nothing_more()
    await client.close()


@pytest_twisted.ensureDeferred
async def test_push_keeps_the_gateway_lists_byte_for_byte(
    redis_pushd: PushdUnderTest, redis_client: Any
) -> None:
    pushd = redis_pushd
    # The gateway's lists are not prefixed: start from none, whatever ran before.
    await redis_client.execute_command("DEL", "orders", "message_gateway_event")
    client = await pushd.connect("?channel=orders")
    await client.next_of("subscribed")
    body = 'hello | "world" ü'
    out, code = await run(
        "curl", "-s", "-X", "POST", "--data-binary", body, f"{pushd.url}/push?c=orders"
    )
    assert code == 0
    status, ms, request_id = out.split("|")
    assert status == "S" and ms.isdigit() and len(request_id) == 32
    entries = await redis_client.execute_command("LRANGE", "orders", 0, -1)
    assert entries == [f"{ms}|{request_id}|{body}"]
    assert await redis_client.execute_command("LRANGE", "message_gateway_event", 0, -1) == [
        "orders"
    ]
    frame = await client.next_of("message")
    assert frame["data"] == body
    await redis_client.execute_command("DEL", "orders", "message_gateway_event")

    out, _ = await run(
        "curl", "-s", "-X", "POST", "--data-binary", "x", f"{pushd.url}/push?c=a%20b"
    )
    assert out.startswith("F|")
    out, _ = await run("curl", "-s", "-X", "POST", "--data-binary", "x", f"{pushd.url}/push")
    assert out == "F|bad channel name"
    await client.close()


@pytest_twisted.ensureDeferred
async def test_push_on_the_memory_broker_says_no_lists_are_kept(start_pushd: Any) -> None:
    pushd = await start_pushd()
    client = await pushd.connect("?channel=orders")
    await client.next_of("subscribed")
    response = await treq.post(f"{pushd.url}/push?c=orders", b"hi", persistent=False)
    assert (await response.text()).startswith("S|")
    if not pushd.cfg.redis:
        assert "no Redis lists" in response.headers.getRawHeaders("warning")[0]
    assert (await client.next_of("message"))["data"] == "hi"
    await client.close()


@pytest_twisted.ensureDeferred
async def test_redis_publish_reaches_live_subscribers(
    redis_pushd: PushdUnderTest, redis_server: RedisServer
) -> None:
    client = await redis_pushd.connect("?channel=news")
    await client.next_of("subscribed")
    channel = redis_pushd.cfg.redis_prefix + "news"
    cli = ("redis-cli", "-p", str(redis_server.port))
    await run(*cli, "PUBLISH", channel, '{"from": "redis"}')
    await run(*cli, "PUBLISH", channel, "plain text")
    first, second = await client.next_of("message"), await client.next_of("message")
    assert (first["id"], first["data"]) == (None, {"from": "redis"})
    assert (second["id"], second["data"]) == (None, "plain text")
    await client.close()


@pytest_twisted.ensureDeferred
async def test_the_shipped_script_publishes_with_history_from_redis_cli(
    redis_pushd: PushdUnderTest, redis_server: RedisServer
) -> None:
    """The README's redis-cli line: a backend in any language publishes with history."""
    prefix = redis_pushd.cfg.redis_prefix
    client = await redis_pushd.connect("?channel=news")
    await client.next_of("subscribed")
    before = await redis_pushd.publish("news", "from pushd")
    await client.next_of("message")
    out, code = await run(
        "redis-cli", "-p", str(redis_server.port), "--eval", str(PUBLISH_LUA),
        f"{prefix}{{news}}:history", ",", f"{prefix}news",
        '{"type":"message","channel":"news","id":', '"from redis-cli"', "100", "3600", "300",
    )  # fmt: skip
    assert code == 0, out
    frame = await client.next_of("message")
    assert frame["data"] == "from redis-cli" and frame["id"] in out
    # It is history like any other message: a client recovering from `before` gets it.
    late = await redis_pushd.connect(f"?channel=news&since={before}")
    assert (await late.next_of("subscribed"))["recovered"] is True
    assert (await late.next_of("message"))["id"] == frame["id"]
    await client.close()
    await late.close()
