"""Idempotency-Key over HTTP: bound to the request it was first used with, on
the hot path and the full path, for single publishes and batches, on every node."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
import treq
from twisted.internet.defer import Deferred, gatherResults

from tests.support import PushdUnderTest, RedisServer, connect_raw
from tests.test_fastpath import hot_path


def raw_post(path: str, body: bytes, key: str, ctype: str = "application/json") -> bytes:
    """A keep-alive POST as producers send it: what the hot path takes."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: pushd\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\nIdempotency-Key: {key}\r\n\r\n"
    )
    return head.encode() + body


def parse_responses(data: bytes) -> list[tuple[int, Any]]:
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])
        }
        length = int(headers["content-length"])
        out.append((int(lines[0].split(" ")[1]), json.loads(rest[:length])))
        data = rest[length:]
    return out


async def post(pushd: PushdUnderTest, path: str, body: bytes, key: str, **kw: Any) -> Any:
    ctype = kw.pop("ctype", "application/json")
    response = await treq.post(
        f"{pushd.url}{path}",
        body,
        headers={"content-type": [ctype], "idempotency-key": [key]},
        persistent=False,
    )
    return response.code, await response.json()


async def history(pushd: PushdUnderTest, channel: str) -> list[Any]:
    response = await treq.get(f"{pushd.url}/channels/{channel}/history?since=0-0", persistent=False)
    return [(m["id"], m["data"]) for m in (await response.json())["messages"]]


@pytest_twisted.ensureDeferred
async def test_a_key_answers_its_first_answer_and_refuses_other_requests(
    pushd: PushdUnderTest,
) -> None:
    status, first = await post(pushd, "/channels/user-1", b'{"n":1}', "evt-123")
    assert status == 200
    # The same request again, on the full path and on the hot path: the first answer.
    assert await post(pushd, "/channels/user-1", b'{"n": 1}', "evt-123") == (200, first)
    raw = await connect_raw(pushd.port)
    taken = hot_path(pushd).taken
    try:
        raw.transport.write(raw_post("/channels/user-1", b'{"n":1}', "evt-123"))
        # The case: the same key on another channel.
        raw.transport.write(raw_post("/channels/user-2", b'{"n":1}', "evt-123"))
        raw.transport.write(raw_post("/channels/user-1", b'{"n":2}', "evt-123"))
        answers = parse_responses(await raw.until(b"HTTP/1.1", count=3))
    finally:
        raw.transport.loseConnection()
    assert hot_path(pushd).taken - taken == 3
    assert answers[0] == (200, first)
    for status, body in answers[1:]:
        assert (status, body["error"]) == (422, "idempotency_key_reused"), body
    # On the full path too, and for a batch under a single publish's key.
    for path, body, ctype in (
        ("/channels/user-2", b'{"n":1}', "application/json"),
        ("/channels/user-1", b"text", "text/plain"),
        ("/publish", b'{"channels":["user-1"],"data":{"n":1}}', "application/json"),
    ):
        status, answer = await post(pushd, path, body, "evt-123", ctype=ctype)
        assert (status, answer["error"]) == (422, "idempotency_key_reused"), answer
    assert await history(pushd, "user-1") == [(first["id"], {"n": 1})]
    assert await history(pushd, "user-2") == []


@pytest_twisted.ensureDeferred
async def test_batch_keys_never_meet_single_keys(pushd: PushdUnderTest) -> None:
    batch = b'{"channel":"k1","data":1}\n{"channel":"k2","data":2}\n'
    status, first = await post(pushd, "/publish", batch, "K", ctype="application/x-ndjson")
    assert status == 200
    # "K#1" was the second message's key when a batch's items had keys of their own.
    status, single = await post(pushd, "/channels/k2", b"2", "K#1")
    assert status == 200 and single["id"] != first["results"][1]["id"]
    again = await post(pushd, "/publish", batch, "K", ctype="application/x-ndjson")
    assert again == (200, first)
    other = b'{"channel":"k1","data":1}\n'
    status, answer = await post(pushd, "/publish", other, "K", ctype="application/x-ndjson")
    assert (status, answer["error"]) == (422, "idempotency_key_reused")
    assert [d for _, d in await history(pushd, "k1")] == [1]
    assert [d for _, d in await history(pushd, "k2")] == [2, 2]


@pytest_twisted.ensureDeferred
async def test_repeats_racing_on_two_nodes_publish_once(
    redis_server: RedisServer, prefix: str
) -> None:
    """One script checks the key and writes: concurrent repeats on two nodes,
    hot path and full path, publish one message and all answer its id."""
    nodes = [PushdUnderTest.config(redis=redis_server.address(), redis_prefix=prefix) for _ in "ab"]
    for node in nodes:
        await node.start()
    raws = [await connect_raw(node.port) for node in nodes]
    try:
        for raw in raws:
            raw.transport.write(
                b"".join(raw_post("/channels/race", b"1", "once") for _ in range(10))
            )
        full = [post(node, "/channels/race", b"1", "once") for node in nodes for _ in range(5)]
        answers = await gatherResults([Deferred.fromCoroutine(c) for c in full])
        for raw in raws:
            answers += parse_responses(await raw.until(b"HTTP/1.1", count=10))
        assert len(answers) == 30
        ids = {body["id"] for status, body in answers if status == 200}
        assert len(ids) == 1 and all(status == 200 for status, _ in answers), answers
        assert [i for i, _ in await history(nodes[0], "race")] == list(ids)
    finally:
        for raw in raws:
            raw.transport.loseConnection()
        for node in nodes:
            await node.stop()


@pytest_twisted.ensureDeferred
async def test_the_command_line_sends_a_key(pushd: PushdUnderTest) -> None:
    from tests.test_client import cli

    args = ("--url", pushd.url, "--idempotency-key", "cli-1")
    code, first, err = await cli("publish", "cli", "hello", *args)
    assert (code, err) == (0, ""), err
    code, again, err = await cli("publish", "cli", "hello", *args)
    assert (code, again) == (0, first), err
    code, out, err = await cli("publish", "cli", "other", *args)
    assert code == 1 and "422 idempotency_key_reused" in err, out + err
    assert [d for _, d in await history(pushd, "cli")] == ["hello"]
