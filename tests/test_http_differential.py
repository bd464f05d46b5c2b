"""One request, one answer, whichever path reads it.

Hypothesis makes publishes, valid and mutated (a byte inserted or replaced in
the head, CR or LF alone, obs-fold, a header repeated, too many headers, a
Content-Length that lies, form bodies, bad channels, bad JSON...). Each goes
to a real pushd (memory broker, and Redis) three times on fresh connections:
in one read with the hot path on, in one read with it off (twisted.web alone),
and cut in pieces across reads. The answers (status, error code, Connection:
close) and the messages that reached the broker must be the same each time;
the hot path's counter says when it took one, and it must take a good share
of them.

The sockets are plain blocking ones, in a thread: pushd runs in the test's
reactor, in the main thread.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import pytest_twisted
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread, deferToThread

from tests.support import PushdUnderTest, StartPushd
from tests.test_http_strict import answers

# More with PUSHD_DIFF_EXAMPLES=2000, for a longer search.
EXAMPLES = int(os.environ.get("PUSHD_DIFF_EXAMPLES", "120"))
# How long an answer may take, and the quiet after the last one that ends a read.
FIRST_ANSWER = 1.0
QUIET = 0.02

CHANNELS = [b"news"] * 6 + [b"a.b:c@d=e+f-g_h", b"dm#alice", b"bad%20name", b"x/history", b""]
CONTENT_TYPES = [
    b"application/json",
    b"application/json; charset=utf-8",
    b"text/plain; charset=utf-8",
    b"application/vnd.pushd+json",
    b"application/x-www-form-urlencoded",
    b"multipart/form-data; boundary=x",
]
BODIES = st.one_of(
    st.sampled_from([b'{"n":1}', b"[1,2]", b'"text"', b"1e400", b"{oops", b"", b"c=elsewhere"]),
    st.builds(lambda n: json.dumps({"n": n}).encode(), st.integers()),
    st.binary(max_size=24),
    st.text(max_size=16).map(str.encode),
)
NAMES = st.sampled_from(
    [b"X-Test"] * 6
    + [b"Accept", b"User-Agent", b"Idempotency-Key", b"Connection", b"Expect", b"X-Forwarded-For"]
    + [b"Origin"]
)
VALUES = st.one_of(
    st.sampled_from([b"keep-alive", b"close", b"Keep-Alive", b"100-continue", b"k1", b""]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12).map(str.encode),
    st.sampled_from([b"caf\xe9", b"a\tb", b" padded "]),
)
ODD_BYTES = st.sampled_from(b'\x00\t\n\r \x01\x7f\x80\xe9\xff:(",;=/')


@st.composite
def requests(draw: Any) -> bytes:
    push = draw(st.integers(0, 4)) == 0
    channel = draw(st.sampled_from(CHANNELS))
    target = (b"/push?c=" if push else b"/channels/") + channel
    method = draw(st.sampled_from([b"POST"] * 12 + [b"GET", b"post"]))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 12 + [b"HTTP/1.0"]))
    body = draw(BODIES)
    lines = [method + b" " + target + b" " + version, b"Host: pushd"]
    ctype = draw(st.one_of(st.none(), st.sampled_from(CONTENT_TYPES)))
    if ctype is not None:
        lines.append(b"Content-Type: " + ctype)
    for name, value in draw(st.lists(st.tuples(NAMES, VALUES), max_size=3)):
        lines.append(name + b": " + value)
    length = draw(st.sampled_from(["right"] * 12 + ["short", "none", "twice", "plus"]))
    if length == "right":
        lines.append(b"Content-Length: %d" % len(body))
    elif length == "short":
        lines.append(b"Content-Length: %d" % max(0, len(body) - 3))
    elif length == "twice":
        lines += [b"Content-Length: %d" % len(body)] * 2
    elif length == "plus":
        lines.append(b"Content-Length: +%d" % len(body))
    if draw(st.integers(0, 19)) == 0:
        lines += [b"X-Many-%d: v" % n for n in range(draw(st.integers(90, 110)))]
    mutation = draw(
        st.sampled_from(["none"] * 4 + ["field"] * 5 + ["insert", "replace", "bare", "fold"])
    )
    if mutation == "field":
        # An odd byte in a header line: its name, its value, around its colon.
        n = draw(st.integers(1, len(lines) - 1))
        at = draw(st.integers(0, len(lines[n])))
        lines[n] = lines[n][:at] + bytes([draw(ODD_BYTES)]) + lines[n][at:]
    head = b"\r\n".join(lines)
    if mutation in ("insert", "replace"):
        at = draw(st.integers(0, len(head) - 1))
        byte = bytes([draw(ODD_BYTES)])
        head = head[:at] + byte + head[at + (mutation == "replace") :]
    elif mutation == "bare":
        breaks = [n for n in range(len(head) - 1) if head[n : n + 2] == b"\r\n"]
        at = draw(st.sampled_from(breaks))
        keep = draw(st.sampled_from([b"\r", b"\n"]))
        head = head[:at] + keep + head[at + 2 :]
    elif mutation == "fold":
        breaks = [n for n in range(len(head) - 1) if head[n : n + 2] == b"\r\n"]
        at = draw(st.sampled_from(breaks))
        head = head[: at + 2] + draw(st.sampled_from([b" ", b"\t"])) + head[at + 2 :]
    return head + b"\r\n\r\n" + body


def _publish(*headers: bytes) -> bytes:
    body = b'{"n":1}'
    lines = [b"POST /channels/news HTTP/1.1", b"Content-Type: application/json", *headers]
    return b"\r\n".join([*lines, b"Content-Length: %d" % len(body), b"", b""]) + body


def exchange(port: int, pieces: list[bytes]) -> list[tuple[int, str, bool]]:
    """Send `pieces` (a pause between them: one read each) on a new connection;
    the answers, as (status, what the body says, Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for n, piece in enumerate(pieces):
            if n:
                time.sleep(0.003)
            s.sendall(piece)
        data = b""
        s.settimeout(FIRST_ANSWER)
        while True:
            try:
                more = s.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                break
            if not more:
                break
            data += more
            s.settimeout(QUIET)
    return summary(data)


def summary(data: bytes) -> list[tuple[int, str, bool]]:
    out = []
    for status, headers, body in answers(data):
        if headers.get("content-type", "").startswith("application/json") and body:
            parsed = json.loads(body)
            what = parsed.get("error") or f"channel={parsed.get('channel')}"
        else:
            what = body[:2].decode("latin-1")  # /push: "S|" or "F|"
        out.append((status, what, headers.get("connection") == "close"))
    return out


def run_examples(pushd: PushdUnderTest) -> dict[str, int]:
    """Hypothesis, in a thread: each request three ways, compared."""
    assert pushd.service is not None
    site = pushd.service.site
    fast = site.fast
    channel_type = site.protocol
    broker = pushd.service.broker
    published: list[tuple[str, bytes]] = []
    publish, push = broker.publish, broker.push

    def spy_publish(channel: str, data: bytes, key: str | None = None) -> Any:
        published.append((channel, data))
        return publish(channel, data, key)

    def spy_push(channel: str, entry: bytes, event_list: str, data: bytes) -> Any:
        published.append((channel, data))
        return push(channel, entry, event_list, data)

    broker.publish, broker.push = spy_publish, spy_push
    stats = {"examples": 0, "hot": 0, "ok": 0}

    def hot_path(on: bool) -> None:
        channel_type.fast = fast if on else None

    def outcome(pieces: list[bytes], on: bool) -> tuple[Any, Any, int]:
        blockingCallFromThread(reactor, hot_path, on)
        del published[:]
        taken = fast.taken
        answers = exchange(pushd.port, pieces)
        return answers, list(published), fast.taken - taken

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(request=requests(), cut=st.integers(1, 1 << 16))
    @example(request=_publish(b"X-Test: a\x00b"), cut=9)
    @example(request=_publish(b"X-Test: a\rb"), cut=9)
    @example(request=_publish(b"X-Test: a\nb"), cut=9)
    @example(request=_publish(b"X(Test: a"), cut=9)
    @example(request=_publish(b"X-Test: a", b" folded"), cut=9)
    @example(request=_publish(*(b"X-%d: v" % n for n in range(100))), cut=9)
    @example(request=_publish(b"X-Test: a"), cut=9)
    def same_answer(request: bytes, cut: int) -> None:
        one_read, one_read_published, taken = outcome([request], on=True)
        full, full_published, not_taken = outcome([request], on=False)
        at = 1 + cut % max(1, len(request) - 1)
        pieces = [request[:1], request[1:at], request[at:]]
        split, split_published, _ = outcome([p for p in pieces if p], on=True)
        assert not_taken == 0
        assert one_read == full == split, (request, one_read, full, split)
        assert one_read_published == full_published == split_published, request
        if taken:
            # The hot path answers only what the broker said.
            assert [a[0] for a in one_read][:1] in ([200], [503], [504], [422]), one_read
        stats["examples"] += 1
        stats["hot"] += taken
        stats["ok"] += bool(one_read and one_read[0][0] == 200)

    try:
        same_answer()
    finally:
        broker.publish, broker.push = publish, push
        blockingCallFromThread(reactor, hot_path, True)
    return stats


@pytest_twisted.ensureDeferred
async def test_the_hot_path_and_twisted_web_answer_alike(
    start_pushd: StartPushd, prefix: str
) -> None:
    # /push's lists are not prefixed: an event list of its own leaves other tests' alone.
    pushd = await start_pushd(handshake_timeout=2, push_event_list=f"{prefix}events")
    stats = await deferToThread(run_examples, pushd)
    # The hot path was not idle: it took a fair number of the requests answered 200
    # (the others: HTTP/1.0, Connection: close, GET, Expect...).
    assert stats["ok"] >= stats["hot"] >= 5, stats
