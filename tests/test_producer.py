"""The producer API, `POST /channels/{channel}`, with treq against a real port."""

from __future__ import annotations

import itertools
import json

import pytest
import pytest_twisted
import treq
from twisted.internet.address import IPv4Address
from twisted.web.test.requesthelper import DummyRequest

from pushd.message import parse_id
from pushd.web.errors import ApiError
from pushd.web.resource import ProducerAuth
from tests.support import SECRET, PushdUnderTest, StartPushd, connect_raw, token


async def _error(response, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    body = await response.json()
    assert response.code == status, body
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert body["error"] == code and body["message"], body


@pytest_twisted.ensureDeferred
async def test_text_and_json_bodies(pushd: PushdUnderTest) -> None:
    client = await pushd.connect("?channel=news")
    await client.next_of("subscribed")

    response = await pushd.post("news", "plain text, ünïcode")
    body = await response.json()
    assert response.code == 200
    assert body["channel"] == "news" and parse_id(body["id"])
    assert (await client.next_of("message"))["data"] == "plain text, ünïcode"

    response = await pushd.post(
        "news", '{"a": [1, 2.5, null]}', headers={"content-type": ["application/json"]}
    )
    assert response.code == 200
    assert (await client.next_of("message"))["data"] == {"a": [1, 2.5, None]}
    await client.close()


@pytest_twisted.ensureDeferred
async def test_ids_strictly_increase_per_channel(pushd: PushdUnderTest) -> None:
    ids = [parse_id(await pushd.publish("seq", n)) for n in range(200)]
    assert all(a < b for a, b in itertools.pairwise(ids))


@pytest_twisted.ensureDeferred
async def test_user_channel_name_is_accepted(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(token_secret=SECRET)
    client = await pushd.connect(f"?channel=dm%23alice,bob&token={token('bob')}")
    joined = {(await client.next_of("subscribed"))["channel"] for _ in range(2)}
    assert joined == {"dm#alice,bob", "user#bob"}
    msg_id = await pushd.publish("dm#alice,bob", "hi")
    assert (await client.next_of("message"))["id"] == msg_id
    await client.close()


@pytest_twisted.ensureDeferred
async def test_bad_requests_change_nothing(pushd: PushdUnderTest) -> None:
    client = await pushd.connect("?channel=news")
    await client.next_of("subscribed")
    json_type = {"content-type": ["application/json"]}

    await _error(await pushd.post("news", "{oops", headers=json_type), 400, "bad_json")
    await _error(await pushd.post("news", b"\xff\xfe", headers=json_type), 400, "bad_text")
    await _error(await pushd.post("news", b"caf\xe9"), 400, "bad_text")
    await _error(await pushd.post("bad name", "x"), 400, "bad_channel")
    await _error(await pushd.post("x" * 129, "x"), 400, "bad_channel")
    await _error(await pushd.post("news", "x" * 65537), 413, "too_large")
    url = f"{pushd.url}/channels/news"
    response = await treq.put(url, b"x", persistent=False)
    await _error(response, 405, "method_not_allowed")
    assert "POST" in response.headers.getRawHeaders("allow")[0]
    await _error(await treq.get(f"{pushd.url}/nothing/here", persistent=False), 404, "not_found")
    await _error(
        await treq.post(f"{pushd.url}/channels/a/b", b"", persistent=False), 404, "not_found"
    )

    await client.nothing_more()
    await client.close()


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_the_limit_is_413(pushd: PushdUnderTest) -> None:
    """A body without Content-Length is counted as it arrives, not stored whole."""
    raw = await connect_raw(pushd.port)
    raw.transport.write(
        b"POST /channels/news HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    for _ in range(20):
        raw.transport.write(b"1000\r\n" + b"y" * 4096 + b"\r\n")
    raw.transport.write(b"0\r\n\r\n")
    answer = await raw.until(b"}")
    raw.transport.loseConnection()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["error"] == "too_large"


@pytest_twisted.ensureDeferred
async def test_api_keys() -> None:
    keyed = PushdUnderTest.config(api_key=("k-one", "k-two"))
    await keyed.start()
    try:
        await _error(await keyed.post("news", "x"), 401, "unauthorized")
        bad = {"authorization": ["Bearer nope"]}
        await _error(await keyed.post("news", "x", headers=bad), 401, "unauthorized")
        basic = {"authorization": ["Basic k-one"]}
        await _error(await keyed.post("news", "x", headers=basic), 401, "unauthorized")
        for key in ("k-one", "k-two"):
            ok = await keyed.post("news", "x", headers={"authorization": [f"Bearer {key}"]})
            assert ok.code == 200, await ok.text()
    finally:
        await keyed.stop()


def test_without_keys_only_loopback_may_publish() -> None:
    auth = ProducerAuth(())
    request = DummyRequest([b""])
    request.client = IPv4Address("TCP", "203.0.113.7", 5555)
    with pytest.raises(ApiError) as refused:
        auth.check(request)
    assert (refused.value.status, refused.value.code) == (403, "forbidden")
    request.client = IPv4Address("TCP", "127.0.0.2", 5555)
    auth.check(request)
