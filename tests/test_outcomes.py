"""Answers a producer can trust when Redis fails: 503 only when nothing was
stored, 504 `outcome_unknown` when the command was sent and no answer came (a
retry with the same Idempotency-Key settles it), batches all or nothing."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
import treq
from twisted.internet.defer import Deferred

from pushd.client import Publisher, PushdError
from tests.support import PushdUnderTest, RedisServer, connect_raw, wait_for, with_timeout
from tests.test_fastpath import hot_path
from tests.test_idempotency import parse_responses, raw_post


@pytest_twisted.async_yield_fixture
async def frozen_pushd(own_redis: RedisServer, prefix: str) -> AsyncIterator[PushdUnderTest]:
    """pushd on a Redis of its own, which the test may SIGSTOP (SIGCONT after)."""
    pushd = PushdUnderTest.config(
        redis=own_redis.address(), redis_prefix=prefix, redis_timeout=1, history_size=5000
    )
    await pushd.start()
    yield pushd
    if own_redis.process is not None:
        own_redis.process.send_signal(signal.SIGCONT)
    await pushd.stop()


async def post(pushd: PushdUnderTest, path: str, body: bytes, key: str | None, **kw: Any) -> Any:
    headers = {"content-type": [kw.get("ctype", "application/json")]}
    if key is not None:
        headers["idempotency-key"] = [key]
    response = await treq.post(f"{pushd.url}{path}", body, headers=headers, persistent=False)
    text = await response.text()
    return response.code, json.loads(text) if text.startswith("{") else text


async def history(pushd: PushdUnderTest, channel: str) -> list[Any]:
    response = await treq.get(
        f"{pushd.url}/channels/{channel}/history?since=0-0&limit=10000", persistent=False
    )
    assert response.code == 200
    return [(m["id"], m["data"]) for m in (await response.json())["messages"]]


async def until_200(pushd: PushdUnderTest, path: str, body: bytes, key: str, **kw: Any) -> Any:
    answers: list[Any] = []

    async def answered() -> bool:
        answers.append(await post(pushd, path, body, key, **kw))
        return answers[-1][0] == 200

    await wait_for(answered, timeout=20, what=f"{path} to answer 200")
    return answers[-1][1]


@pytest_twisted.ensureDeferred
async def test_a_frozen_redis_answers_504_and_a_retry_settles_it(
    frozen_pushd: PushdUnderTest, own_redis: RedisServer
) -> None:
    pushd = frozen_pushd
    assert own_redis.process is not None
    assert (await post(pushd, "/channels/frozen", b"0", None))[0] == 200
    raw = await connect_raw(pushd.port)
    try:
        own_redis.process.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        # The hot path, the full path, a batch, /push: each command is written, then nothing.
        taken = hot_path(pushd).taken
        raw.transport.write(raw_post("/channels/frozen", b"1", "hot"))
        full = Deferred.fromCoroutine(post(pushd, "/channels/frozen", b"2", "full"))
        batch = Deferred.fromCoroutine(
            post(pushd, "/publish", b'{"channels":["frozen","other"],"data":3}', "batch")
        )
        push = Deferred.fromCoroutine(post(pushd, "/push?c=frozen", b"4", None))
        ((status, body),) = parse_responses(await raw.until(b"HTTP/1.1", timeout=5))
        assert (status, body["error"]) == (504, "outcome_unknown"), body
        assert hot_path(pushd).taken - taken == 1
        for answer in (full, batch):
            status, body = await with_timeout(answer, 5)
            assert (status, body["error"]) == (504, "outcome_unknown"), body
        assert await with_timeout(push, 5) == (504, "F|redis did not answer: outcome unknown")
        assert time.monotonic() - started < 3.5
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
        raw.transport.loseConnection()
    # Retried with the same keys: each message is stored once, under the id answered.
    hot = await until_200(pushd, "/channels/frozen", b"1", "hot")
    full_id = await until_200(pushd, "/channels/frozen", b"2", "full")
    results = await until_200(
        pushd, "/publish", b'{"channels":["frozen","other"],"data":3}', "batch"
    )
    stored = await history(pushd, "frozen")
    data = [d for _, d in stored]
    assert data.count(1) == data.count(2) == data.count(3) == 1 and data.count(4) <= 1
    assert (hot["id"], 1) in stored and (full_id["id"], 2) in stored
    assert (results["results"][0]["id"], 3) in stored
    assert await history(pushd, "other") == [(results["results"][1]["id"], 3)]


@pytest_twisted.ensureDeferred
async def test_the_publisher_retries_504_under_one_key(
    frozen_pushd: PushdUnderTest, own_redis: RedisServer
) -> None:
    pushd = frozen_pushd
    assert own_redis.process is not None

    class Counting(Publisher):
        statuses: list[int] = []

        async def _attempt(self, url: str, body: bytes, headers: Any) -> Any:
            try:
                return await super()._attempt(url, body, headers)
            except PushdError as exc:
                self.statuses.append(exc.status)
                raise

    publisher = Counting(pushd.url, retries=50, backoff=0.05, max_backoff=0.2)
    try:
        own_redis.process.send_signal(signal.SIGSTOP)
        single = Deferred.fromCoroutine(publisher.publish("retried", {"n": 1}))
        batch = Deferred.fromCoroutine(publisher.publish_batch([("retried", 2), ("retried", 3)]))
        await wait_for(lambda: 504 in publisher.statuses, what="a 504")
        own_redis.process.send_signal(signal.SIGCONT)
        msg_id = await with_timeout(single, 20)
        ids = await with_timeout(batch, 20)
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
        await publisher.close()
    assert sorted(await history(pushd, "retried")) == sorted(
        [(msg_id, {"n": 1}), (ids[0], 2), (ids[1], 3)]
    )


def batch_body(channels: list[str], count: int) -> bytes:
    lines = [
        json.dumps({"channel": channels[n % len(channels)], "data": {"n": n}}) for n in range(count)
    ]
    return ("\n".join(lines) + "\n").encode()


@pytest_twisted.ensureDeferred
async def test_a_batch_that_fails_late_publishes_nothing(
    redis_pushd: PushdUnderTest, redis_client: Any, prefix: str
) -> None:
    """2,500 messages; the last one's channel cannot take a message (its stream
    key holds a string): Redis refuses the batch before its first write (503)."""
    pushd = redis_pushd
    await redis_client.set(f"{prefix}{{late}}:history", "not a stream")
    body = batch_body(["b0", "b1", "b2"], 2499) + b'{"channel":"late","data":1}\n'
    status, answer = await post(pushd, "/publish", body, "late-batch", ctype="application/x-ndjson")
    assert (status, answer["error"]) == (503, "unavailable"), answer
    for channel in ("b0", "b1", "b2"):
        assert await history(pushd, channel) == []
    # Nothing was bound to the key either: once the channel can take it, the batch goes.
    await redis_client.delete(f"{prefix}{{late}}:history")
    status, answer = await post(pushd, "/publish", body, "late-batch", ctype="application/x-ndjson")
    assert status == 200 and len(answer["results"]) == 2500
    assert (await history(pushd, "b0"))[-1] == (answer["results"][2496]["id"], {"n": 2496})


@pytest_twisted.ensureDeferred
async def test_a_batch_cut_off_by_a_frozen_redis_is_whole_or_absent(
    frozen_pushd: PushdUnderTest, own_redis: RedisServer
) -> None:
    pushd = frozen_pushd
    assert own_redis.process is not None
    body = batch_body(["c0", "c1"], 2500)
    own_redis.process.send_signal(signal.SIGSTOP)
    try:
        status, answer = await post(pushd, "/publish", body, "cut", ctype="application/x-ndjson")
        assert (status, answer["error"]) == (504, "outcome_unknown"), answer
    finally:
        own_redis.process.send_signal(signal.SIGCONT)

    async def readable() -> bool:
        response = await treq.get(f"{pushd.url}/channels/c0/history", persistent=False)
        return response.code == 200

    await wait_for(readable, what="Redis to answer again")
    stored = len(await history(pushd, "c0")) + len(await history(pushd, "c1"))
    assert stored in (0, 2500)
    results = await until_200(pushd, "/publish", body, "cut", ctype="application/x-ndjson")
    assert len(results["results"]) == 2500
    assert len(await history(pushd, "c0")) + len(await history(pushd, "c1")) == 2500


@pytest_twisted.ensureDeferred
async def test_a_client_publish_to_a_frozen_redis_says_outcome_unknown(
    own_redis: RedisServer, prefix: str
) -> None:
    from tests.support import SECRET, token

    pushd = PushdUnderTest.config(
        redis=own_redis.address(), redis_prefix=prefix, redis_timeout=1, token_secret=SECRET
    )
    await pushd.start()
    assert own_redis.process is not None
    client = await pushd.connect(f"?channel=chat&token={token(None, ['chat'], ['chat'])}")
    try:
        await client.next_of("subscribed")
        own_redis.process.send_signal(signal.SIGSTOP)
        client.send({"type": "publish", "channel": "chat", "data": "lost?"})
        frame = await client.next_of("error")
        assert (frame["code"], frame["channel"]) == ("outcome_unknown", "chat"), frame
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
        await client.close()
        await pushd.stop()
