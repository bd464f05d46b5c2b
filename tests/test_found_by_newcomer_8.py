"""Defects found by an eighth newcomer trying to break three recent changes:
push.lua without TYPE checks (taking back its LPUSHes), the batch's one check
of the whole body for long numbers, and a client's publish waiting at most
ACK_WAIT for its own pending subscription.

Each test is the minimal reproduction of a defect; both are fixed (929e33c and
a46508c: lines end at LF; `Session.acknowledged`: one deadline a subscription,
ACK_WAIT after the first publish that waits, for all of them).

- A batch (`POST /publish`, NDJSON) is cut into lines with `str.splitlines`,
  which also cuts at U+2028, U+2029 and U+0085 (and \\x0b, \\x0c, \\x1c-\\x1e).
  Those three may stand raw inside a JSON string (RFC 8259 only forbids
  U+0000-U+001F there), and `POST /channels/{c}` takes such data; in a batch
  the line is cut in two and the whole batch is refused `400 bad_json`.
  Suspected place: pushd/web/batch.py `parse_batch` (`text.splitlines()`:
  NDJSON's separator is \\n, with an optional \\r before it).

- A client's publishes go one after the other (`_publishing`), and each one
  to a channel whose subscription is pending waits its own ACK_WAIT: with the
  subscription unable to complete (Redis down), the n-th queued publish is
  answered only after n x ACK_WAIT (1 s each, up to the burst of 20: 20 s),
  not "at most ACK_WAIT". Suspected place: pushd/transports/websocket.py
  `_publish` (a new `Session.acknowledged` waiter, and a new timeout, for
  each publish; the timed-out waiters also stay in `Session._acks` until the
  subscription ends).

Everything else tried passes (not tests here). push.lua, run by hand on Redis
7.0.15 (EVAL of scripts.PUSH.source) and through /push: an event list, a
history stream, a :meta key of another type, a channel named as the event
list, a :meta id in the future or at the last sequence, a stream at the last
possible id: each answers one well-formed error reply (Redis 7's error table
unwrapped by `refused`; the channel's own list of another type fails the
first, unprotected LPUSH, with Redis's own "script: ..." suffix) and leaves
every key as it was (a 1,000-entry list whose head equals the entry pushed
keeps its 1,000 entries, the event list its old entries). The batch's one
check: bodies whose whole has no run of 19+ digits cannot have a line that
does (a line is a substring); > 2**64, negative, 19/20 digits around
int64/uint64 bounds, digits in strings and keys, long mantissas, 1e400, BOM,
invalid UTF-8, lone surrogate escapes, \\r\\n, blank lines: same answers as
per-line checks; 200,000 random floats of <= 18 digits read the same by
orjson and the stdlib.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import pytest_twisted
import treq

from tests.support import SECRET, PushdUnderTest, RedisServer
from tests.test_found_by_newcomer_7 import writer_without_redis


async def history(pushd: PushdUnderTest, channel: str) -> list[Any]:
    r = await treq.get(f"{pushd.url}/channels/{channel}/history?limit=100", persistent=False)
    body = await r.json()
    assert r.code == 200, body
    return body["messages"]  # type: ignore[no-any-return]


# -- 1. the batch's lines


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
@pytest_twisted.ensureDeferred
async def test_a_batch_line_whose_string_holds_a_raw_unicode_line_separator_is_published(
    redis_pushd: PushdUnderTest, prefix: str, separator: str
) -> None:
    """`"a<sep>b"` with the separator raw (valid JSON): POST /channels stores
    it; the same message as a one-line NDJSON batch was refused 400, the line
    cut in two by str.splitlines."""
    data = f"a{separator}b"
    alone = await redis_pushd.post(
        "sep.alone",
        json.dumps(data, ensure_ascii=False),
        headers={"content-type": ["application/json"]},
    )
    assert alone.code == 200, await alone.text()
    line = json.dumps({"channel": "sep.batch", "data": data}, ensure_ascii=False)
    response = await treq.post(
        f"{redis_pushd.url}/publish",
        (line + "\n").encode(),
        headers={"content-type": ["application/x-ndjson"]},
        persistent=False,
    )
    body = await response.json()
    assert response.code == 200, (
        f"a batch line with a raw U+{ord(separator):04X} in a string was refused: {body}"
    )
    stored = [m["data"] for m in await history(redis_pushd, "sep.batch")]
    assert stored == [m["data"] for m in await history(redis_pushd, "sep.alone")] == [data]


# -- 3. a client's publish waiting for its own subscription


@pytest_twisted.ensureDeferred
async def test_queued_publishes_to_a_pending_channel_are_each_answered_within_ack_wait(
    own_redis: RedisServer, prefix: str
) -> None:
    """Redis gone: a WebSocket subscribes to C (cannot complete) and sends 4
    publishes to C at once. Found broken: they are answered one a second (each
    waits its own ACK_WAIT behind the one before), the 4th after ~4 s; a
    client with the default burst (20) waits 20 s for its last answer."""
    pushd = PushdUnderTest.config(
        redis=own_redis.address(), redis_prefix=prefix, token_secret=SECRET
    )
    await pushd.start()
    try:
        writer = await writer_without_redis(pushd, own_redis)
        writer.send({"type": "subscribe", "channel": "room.a"})
        sent = time.monotonic()
        for n in range(4):
            writer.send({"type": "publish", "channel": "room.a", "data": n})
        answered: list[float] = []
        deadline = sent + 8
        while len(answered) < 4 and time.monotonic() < deadline:
            try:
                frame = await writer.next(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:
                break
            if frame["type"] == "error" and frame.get("code") in ("unavailable", "outcome_unknown"):
                answered.append(round(time.monotonic() - sent, 2))
        assert len(answered) == 4, f"answers after (s): {answered}"
        assert answered[-1] < 2.5, (
            f"4 queued publishes answered after {answered} s: each waited its own "
            "ACK_WAIT (1 s), the last ~4 s, not at most ACK_WAIT"
        )
        await writer.close()
    finally:
        await pushd.stop()
