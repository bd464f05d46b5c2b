"""The producers' hot path (pushd.web.hotpath): keep-alive `POST /channels/{c}`
over a raw socket, one request per read or many at once, answered like the
full HTTP stack answers them, with nothing lost or reordered."""

from __future__ import annotations

import json
import signal
import time

import pytest_twisted
import treq

from pushd.message import parse_id
from pushd.web.hotpath import FastPublish
from tests.support import PushdUnderTest, RedisServer, StartPushd, connect_raw, wait_for


def post(channel: str, body: bytes, *headers: str) -> bytes:
    lines = [
        f"POST /channels/{channel} HTTP/1.1",
        "Host: pushd",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def hot_path(pushd: PushdUnderTest) -> FastPublish:
    """The site's hot path, whose counters say which requests it took."""
    assert pushd.service is not None and pushd.service.site.fast is not None
    return pushd.service.site.fast


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The HTTP/1.1 responses in `data`, in order: status, headers, body."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        out.append((int(status_line.split(" ")[1]), headers, rest[:length]))
        data = rest[length:]
    return out


@pytest_twisted.ensureDeferred
async def test_keep_alive_publishes_one_by_one(pushd: PushdUnderTest) -> None:
    client = await pushd.connect("?channel=hot")
    await client.next_of("subscribed")
    raw = await connect_raw(pushd.port)
    taken = hot_path(pushd).taken
    for n in range(20):
        raw.transport.write(post("hot", json.dumps({"n": n}).encode()))
        await raw.until(b"HTTP/1.1 200 OK", count=n + 1)
    assert hot_path(pushd).taken - taken == 20
    answers = responses(raw.data)
    ids = [json.loads(body)["id"] for _, _, body in answers]
    assert [status for status, _, _ in answers] == [200] * 20
    assert {h["content-type"] for _, h, _ in answers} == {"application/json"}
    assert all(h["date"].endswith(" GMT") for _, h, _ in answers)
    assert sorted(ids, key=parse_id) == ids and len(set(ids)) == 20
    got = [await client.next_of("message") for _ in range(20)]
    assert [(m["id"], m["data"]) for m in got] == [(ids[n], {"n": n}) for n in range(20)]

    response = await treq.get(f"{pushd.url}/metrics", persistent=False)
    assert 'pushd_messages_published_total{api="channels"} 20.0' in await response.text()
    raw.transport.loseConnection()
    await client.close()


@pytest_twisted.ensureDeferred
async def test_requests_sent_back_to_back_are_answered_in_order(pushd: PushdUnderTest) -> None:
    """Pipelined requests, and requests arriving while one waits for the broker:
    most take the hot path (a request cut in two by a read goes to twisted.web)."""
    client = await pushd.connect("?channel=pipe")
    await client.next_of("subscribed")
    raw = await connect_raw(pushd.port)
    taken = hot_path(pushd).taken
    for n in range(200):
        raw.transport.write(post("pipe", str(n).encode()))
    await raw.until(b"HTTP/1.1 ", count=200)
    answers = responses(raw.data)
    assert [status for status, _, _ in answers] == [200] * 200
    assert hot_path(pushd).taken - taken >= 150
    ids = [json.loads(body)["id"] for _, _, body in answers]
    got = [await client.next_of("message") for _ in range(200)]
    assert [(m["id"], m["data"]) for m in got] == [(ids[n], n) for n in range(200)]
    raw.transport.loseConnection()
    await client.close()


@pytest_twisted.ensureDeferred
async def test_errors_and_other_requests_on_the_same_connection(pushd: PushdUnderTest) -> None:
    raw = await connect_raw(pushd.port)
    sent = [
        post("ok", b"1"),
        post("bad%20channel", b"1"),
        post("ok", b"{not json"),
        post("ok", b"2", "Idempotency-Key: k1"),
        post("ok", b"2", "Idempotency-Key: k1"),
        b"GET /channels/ok HTTP/1.1\r\nHost: pushd\r\n\r\n",
        post("ok", b"3"),
    ]
    for n, request in enumerate(sent):
        raw.transport.write(request)
        await raw.until(b"HTTP/1.1 ", count=n + 1)
    answers = [(status, json.loads(body)) for status, _, body in responses(raw.data)]
    assert [status for status, _ in answers] == [200, 400, 400, 200, 200, 200, 200]
    assert answers[1][1]["error"] == "bad_channel" and answers[2][1]["error"] == "bad_json"
    assert answers[3][1]["id"] == answers[4][1]["id"]  # the repeat publishes nothing
    assert answers[5][1]["last_id"] == answers[3][1]["id"]
    assert parse_id(answers[6][1]["id"]) > parse_id(answers[3][1]["id"])
    # The publishes took the hot path; the refusals were twisted.web's.
    assert (hot_path(pushd).tried, hot_path(pushd).taken) == (6, 4)
    raw.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_the_hot_path_asks_for_the_key(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(api_key=("k",))
    raw = await connect_raw(pushd.port)
    fast = hot_path(pushd)
    raw.transport.write(post("keyed", b"1"))
    await raw.until(b"HTTP/1.1 ")
    raw.transport.write(post("keyed", b"1", "Authorization: Bearer nope"))
    await raw.until(b"HTTP/1.1 ", count=2)
    raw.transport.write(post("keyed", b"1", "Authorization: Bearer k"))
    await raw.until(b"HTTP/1.1 ", count=3)
    answers = responses(raw.data)
    assert [status for status, _, _ in answers] == [401, 401, 200]
    assert answers[0][1]["www-authenticate"] == 'Bearer realm="pushd"'
    assert (fast.tried, fast.taken) == (3, 1)  # the refusals are twisted.web's
    raw.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_the_hot_path_believes_only_trusted_proxies(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(trusted_proxies=1)
    raw = await connect_raw(pushd.port)
    raw.transport.write(post("fwd", b"1", "X-Forwarded-For: 203.0.113.9"))
    await raw.until(b"HTTP/1.1 ")
    raw.transport.write(post("fwd", b"1", "X-Forwarded-For: 127.0.0.1"))
    await raw.until(b"HTTP/1.1 ", count=2)
    assert [status for status, _, _ in responses(raw.data)] == [403, 200]
    assert (hot_path(pushd).tried, hot_path(pushd).taken) == (2, 1)
    raw.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_the_hot_path_answers_503_without_redis(own_redis: RedisServer, prefix: str) -> None:
    pushd = PushdUnderTest.config(redis=own_redis.address(), redis_prefix=prefix, redis_timeout=2)
    await pushd.start()
    try:
        raw = await connect_raw(pushd.port)
        raw.transport.write(post("down", b"1"))
        await raw.until(b"HTTP/1.1 200")
        own_redis.kill()
        count = 1

        async def refused() -> bool:
            nonlocal count
            count += 1
            raw.transport.write(post("down", b"2"))
            await raw.until(b"HTTP/1.1 ", count=count)
            return responses(raw.data)[-1][0] == 503

        await wait_for(refused, what="a 503 on the kept-alive connection")
        assert hot_path(pushd).taken == count  # every one, the 503s too
        _, headers, body = responses(raw.data)[-1]
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["error"] == "unavailable"
        raw.transport.loseConnection()
    finally:
        await pushd.stop()


@pytest_twisted.ensureDeferred
async def test_push_on_a_kept_alive_connection(start_pushd: StartPushd) -> None:
    """The gateway's contract on the hot path: `S|ms|id`, the lists, live delivery."""
    pushd = await start_pushd(push_event_list="fast-events")
    client = await pushd.connect("?channel=fast-orders")
    await client.next_of("subscribed")
    raw = await connect_raw(pushd.port)
    for n in range(3):
        body = f'{{"n":{n}}}'.encode()
        raw.transport.write(
            b"POST /push?c=fast-orders HTTP/1.1\r\nHost: pushd\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        await raw.until(b"HTTP/1.1 200", count=n + 1)
    answers = responses(raw.data)
    assert [body.split(b"|")[0] for _, _, body in answers] == [b"S"] * 3
    assert hot_path(pushd).taken == 3
    assert {h["content-type"] for _, h, _ in answers} == {"text/plain; charset=utf-8"}
    memory = not pushd.cfg.redis
    assert all(("warning" in h) == memory for _, h, _ in answers)
    got = [await client.next_of("message") for _ in range(3)]
    assert [m["data"] for m in got] == [{"n": 0}, {"n": 1}, {"n": 2}]
    raw.transport.loseConnection()
    await client.close()


@pytest_twisted.ensureDeferred
async def test_a_redis_that_stops_answering_gets_504_then_recovers(
    own_redis: RedisServer, prefix: str
) -> None:
    """Redis frozen (SIGSTOP): a publish sent to it answers 504 outcome_unknown
    (it may be stored) within twice --redis-timeout; once Redis answers again,
    so does publishing."""
    pushd = PushdUnderTest.config(redis=own_redis.address(), redis_prefix=prefix, redis_timeout=1)
    await pushd.start()
    raw = await connect_raw(pushd.port)
    try:
        raw.transport.write(post("frozen", b"1"))
        await raw.until(b"HTTP/1.1 200")
        assert own_redis.process is not None
        own_redis.process.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        taken = hot_path(pushd).taken
        raw.transport.write(post("frozen", b"2"))
        await raw.until(b"HTTP/1.1 504", timeout=5)
        assert time.monotonic() - started < 2.5
        assert json.loads(responses(raw.data)[-1][2])["error"] == "outcome_unknown"
        assert hot_path(pushd).taken == taken + 1
        own_redis.process.send_signal(signal.SIGCONT)

        async def published() -> bool:
            response = await pushd.post("frozen", "3")
            return response.code == 200

        await wait_for(published, what="publishing after Redis answers again")
    finally:
        if own_redis.process is not None:
            own_redis.process.send_signal(signal.SIGCONT)
        raw.transport.loseConnection()
        await pushd.stop()
