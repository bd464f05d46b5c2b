"""pushd's HTTP connection, byte for byte, without a network: the hot path and
twisted.web give one answer to one request whether it arrives in one read or
byte by byte; a head outside RFC 9110's grammar is refused on both; errors of
the parser are JSON; an over-limit body announced with `Expect: 100-continue`
gets 413 at once; reading pauses while a hot-path publish waits; a stopping
node answers what it took, refuses what comes, and closes.

Each test drives `PushdChannel` over a StringTransport, on a site made by
make_service (memory broker) with a MemoryReactorClock.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport

from pushd.broker import Published
from pushd.config import Config
from pushd.service import make_service
from pushd.web.channel import PushdChannel
from pushd.web.hotpath import MAX_HEADERS, bad_field_line
from pushd.web.site import PushdSite

MAX_MESSAGE_SIZE = 1000


class Served:
    """A site of its own, the publishes that reached its broker, and connections."""

    def __init__(self, **overrides: Any) -> None:
        self.clock = MemoryReactorClock()
        base = Config(listen=("tcp:0:interface=127.0.0.1",), ping_interval=0)
        settings = {"max_message_size": MAX_MESSAGE_SIZE, "max_batch_size": MAX_MESSAGE_SIZE}
        cfg = Config(**{**base.__dict__, **settings, **overrides, "given": {}})
        self.service = make_service(cfg, reactor=self.clock)
        self.site: PushdSite = self.service.site
        self.published: list[tuple[str, bytes]] = []
        broker = self.service.broker
        self._publish = broker.publish
        #: When set, publishes wait for the test to fire them.
        self.pending: list[tuple[Deferred[Published], str, bytes]] | None = None
        broker.publish = self._spy  # type: ignore[method-assign]

    def _spy(self, channel: str, data: bytes, key: str | None = None) -> Deferred[Published]:
        self.published.append((channel, data))
        if self.pending is None:
            return self._publish(channel, data, key)
        d: Deferred[Published] = Deferred()
        self.pending.append((d, channel, data))
        return d

    def release(self) -> None:
        """Let the waiting publishes through, in order."""
        assert self.pending is not None
        waiting, self.pending = self.pending, []
        for d, channel, data in waiting:
            self._publish(channel, data).chainDeferred(d)

    @property
    def taken(self) -> int:
        assert self.site.fast is not None
        return self.site.fast.taken

    @property
    def tried(self) -> int:
        assert self.site.fast is not None
        return self.site.fast.tried

    def connect(self) -> tuple[PushdChannel, StringTransport]:
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        channel = self.site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        channel.makeConnection(transport)
        return channel, transport

    def exchange(self, request: bytes, split: bool = False) -> list[Answer]:
        """The answers to `request` on a new connection, sent in one read or byte by byte."""
        channel, transport = self.connect()
        if split:
            for n in range(len(request)):
                channel.dataReceived(request[n : n + 1])
        else:
            channel.dataReceived(request)
        return answers(transport.value())


Answer = tuple[int, dict[str, str], bytes]


def answers(data: bytes) -> list[Answer]:
    """The HTTP/1.1 responses in `data`: status, headers (lower-case names), body.
    A `100 Continue` is a response of its own (with an empty body)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        out.append((int(status_line.split(" ")[1]), headers, rest[:length]))
        data = rest[length:]
    return out


def post(
    channel: str = "news",
    body: bytes = b'{"n":1}',
    *headers: bytes,
    length: bool = True,
) -> bytes:
    lines = [b"POST /channels/" + channel.encode() + b" HTTP/1.1", b"Host: pushd"]
    lines += [b"Content-Type: application/json", *headers]
    if length:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def error_of(answer: Answer) -> str:
    _, headers, body = answer
    assert headers["content-type"] == "application/json", answer
    error = json.loads(body)
    assert error["message"], error
    return str(error["error"])


@pytest.fixture
def served() -> Served:
    return Served()


# -- one answer, one read or many


def test_a_whole_publish_takes_the_hot_path(served: Served) -> None:
    (answer,) = served.exchange(post())
    assert answer[0] == 200 and json.loads(answer[2])["channel"] == "news"
    assert served.taken == 1 and served.published == [("news", b'{"n":1}')]


def test_a_browsers_publish_takes_the_full_path(served: Served) -> None:
    """With an Origin: CORS and the origin check are twisted.web's."""
    (answer,) = served.exchange(post("news", b"1", b"Origin: https://app.example"))
    assert answer[0] == 200 and served.taken == 0 and served.tried == 1


def test_the_same_publish_byte_by_byte_takes_twisted_web(served: Served) -> None:
    (answer,) = served.exchange(post(), split=True)
    assert answer[0] == 200 and json.loads(answer[2])["channel"] == "news"
    assert served.taken == 0 and served.published == [("news", b'{"n":1}')]


BAD_HEADS = [
    pytest.param(b"X-Test: a\x00b", id="nul-in-value"),
    pytest.param(b"X-Test: a\rb", id="bare-cr-in-value"),
    pytest.param(b"X-Test: a\nb", id="bare-lf-in-value"),
    pytest.param(b"X-Test: a\x01b", id="ctl-in-value"),
    pytest.param(b"X-Test: a\x7fb", id="del-in-value"),
    pytest.param(b"X-Test: a\x1bb", id="escape-in-value"),
    pytest.param(b"X(Test: a", id="bad-name-char"),
    pytest.param(b"X-Test : a", id="space-before-colon"),
    pytest.param(b"X\x00Test: a", id="nul-in-name"),
    pytest.param(b"X\xe9: a", id="latin1-in-name"),
    pytest.param(b": a", id="empty-name"),
    pytest.param(b"X-Test: a\r\n b", id="obs-fold-space"),
    pytest.param(b"X-Test: a\r\n\tb", id="obs-fold-tab"),
    pytest.param(b"X-Test a", id="no-colon"),
]


@pytest.mark.parametrize("bad", BAD_HEADS)
@pytest.mark.parametrize("split", [False, True], ids=["one-read", "byte-by-byte"])
def test_a_head_outside_the_grammar_is_refused_on_both_paths(
    served: Served, bad: bytes, split: bool
) -> None:
    channel, transport = served.connect()
    request = post("news", b"1", bad)
    if split:
        for n in range(len(request)):
            channel.dataReceived(request[n : n + 1])
    else:
        channel.dataReceived(request)
    (answer,) = answers(transport.value())
    assert answer[0] == 400 and error_of(answer) == "bad_request", answer
    assert answer[1]["connection"] == "close"
    assert transport.disconnecting
    assert served.published == [] and served.taken == 0
    assert served.tried == (0 if split else 1)  # in one read, the hot path saw it first


def test_values_the_grammar_allows_are_taken(served: Served) -> None:
    """Tabs, obs-text (bytes 0x80-0xff) and every token character in a name."""
    request = post("news", b"1", b"X-Tab:\ta\tb\t", b"X-Latin: caf\xe9", b"!#$%&'*+-.^_`|~09az: v")
    for split in (False, True):
        (answer,) = served.exchange(request, split)
        assert answer[0] == 200, answer
    assert served.taken == 1 and len(served.published) == 2


def test_every_byte_in_a_name_and_a_value(served: Served) -> None:
    """llhttp (the hot path) and the full path's grammar agree on each of the
    256 bytes, in a header name and in a header value."""
    for byte in range(256):
        b = bytes([byte])
        for line in (b"X-" + b + b"T: v", b"X-T: a" + b + b"z"):
            grammar_ok = not bad_field_line(line)
            for split in (False, True):
                before = (served.taken, len(served.published))
                result = served.exchange(post("news", b"1", line), split)
                ok = len(result) == 1 and result[0][0] == 200
                assert ok == grammar_ok, (line, split, result)
                taken = served.taken - before[0]
                assert taken == (1 if ok and not split else 0), (line, split)
                assert len(served.published) - before[1] == (1 if ok else 0)


def test_a_header_count_past_the_limit_is_refused_on_both_paths(served: Served) -> None:
    fields = [b"X-F%d: v" % n for n in range(MAX_HEADERS - 3)]  # Host, Content-*: 3 more
    for split in (False, True):
        (answer,) = served.exchange(post("news", b"1", *fields), split)
        assert answer[0] == 200, answer
        (answer,) = served.exchange(post("news", b"1", *fields, b"X-One-Too-Many: v"), split)
        assert answer[0] == 400 and error_of(answer) == "too_many_headers", answer
    assert served.taken == 1 and len(served.published) == 2


def test_a_head_over_the_size_limit_is_refused_on_both_paths(served: Served) -> None:
    limit = served.site.protocol.max_header_size  # type: ignore[attr-defined]
    fits = post("news", b"1")
    filler = b"X-Fill: " + b"f" * (limit - len(fits) + len(b"1") - len(b"X-Fill: \r\n"))
    for split in (False, True):
        (answer,) = served.exchange(post("news", b"1", filler), split)
        assert answer[0] == 200, answer
        (answer,) = served.exchange(post("news", b"1", filler + b"f"), split)
        assert answer[0] == 431 and error_of(answer) == "headers_too_large", answer
    assert served.taken == 1 and len(served.published) == 2


def test_a_bad_request_line_is_refused_on_both_paths(served: Served) -> None:
    for line in (b"POST /channels/caf\xe9 HTTP/1.1", b"POST /channels/a\x7f HTTP/1.1"):
        for split in (False, True):
            request = line + b"\r\nContent-Length: 1\r\n\r\n1"
            (answer,) = served.exchange(request, split)
            assert answer[0] == 400 and error_of(answer) == "bad_request", answer
    assert served.published == [] and served.taken == 0


# -- pipelining and the bound on what waits


def test_pipelined_publishes_all_take_the_hot_path(served: Served) -> None:
    channel, transport = served.connect()
    channel.dataReceived(b"".join(post("pipe", b"%d" % n) for n in range(50)))
    got = answers(transport.value())
    assert [a[0] for a in got] == [200] * 50
    assert [data for _, data in served.published] == [b"%d" % n for n in range(50)]
    ids = [json.loads(a[2])["id"] for a in got]
    assert len(set(ids)) == 50
    assert served.taken == 50


def test_pipelined_requests_the_hot_path_does_not_take_keep_their_order(served: Served) -> None:
    channel, transport = served.connect()
    sent = [
        post("a", b"1"),
        b"GET /channels/a HTTP/1.1\r\nHost: pushd\r\n\r\n",
        post("a", b"2"),
        post("bad%20channel", b"3"),
        post("a", b"4"),
    ]
    channel.dataReceived(b"".join(sent))
    got = answers(transport.value())
    assert [a[0] for a in got] == [200, 200, 200, 400, 200]
    assert [data for _, data in served.published] == [b"1", b"2", b"4"]


def test_reading_pauses_while_a_hot_path_publish_waits_past_the_bound(served: Served) -> None:
    served.pending = []
    channel, transport = served.connect()
    channel.dataReceived(post("slow", b"0"))
    assert served.taken == 1 and transport.producerState == "producing"
    # Pipelined publishes pile up behind it; past the bound, reading stops.
    piece = b"".join(post("slow", b"%d" % n) for n in range(1, 101))
    sent = 0
    while transport.producerState == "producing":
        channel.dataReceived(piece)
        sent += 100
        assert sent < 10_000, "reading never paused"
    assert sent * len(piece) // 100 > channel.fast_queue_limit
    assert transport.value() == b""  # nothing answered yet
    while served.pending:
        served.release()
    assert transport.producerState == "producing"
    got = answers(transport.value())
    assert len(got) == sent + 1 and {a[0] for a in got} == {200}
    expected = [0, *(list(range(1, 101)) * (sent // 100))]
    assert [int(data) for _, data in served.published] == expected


# -- the parser's own errors, as JSON


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/9.9\r\n\r\n", 400, "bad_request"),
        (post("x", b"1", b"Content-Length: 2"), 400, "bad_request"),
        (post("x", b"zz\r\n", b"Transfer-Encoding: chunked", length=False), 400, "bad_request"),
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 414, "url_too_long"),
        (b"GET / HTTP/1.1\r\n" + b"X-A: %s\r\n" % (b"a" * 20000), 431, "headers_too_large"),
    ],
    ids=["garbage", "version", "content-length-twice", "bad-chunk", "414", "431"],
)
def test_errors_of_the_http_parser_are_json(
    served: Served, request_bytes: bytes, status: int, code: str
) -> None:
    channel, transport = served.connect()
    channel.dataReceived(request_bytes)
    (answer,) = answers(transport.value())
    assert answer[0] == status and error_of(answer) == code, answer
    assert answer[1]["connection"] == "close" and transport.disconnecting


def test_a_head_sent_too_slowly_gets_a_json_408(served: Served) -> None:
    channel, transport = served.connect()
    channel.dataReceived(b"POST /channels/x HTTP/1.1\r\n")
    served.clock.advance(served.site.protocol.handshake_timeout + 0.1)  # type: ignore[attr-defined]
    (answer,) = answers(transport.value())
    assert answer[0] == 408 and error_of(answer) == "timeout"


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405, "method_not_allowed"),
        (b"BREW / HTTP/1.1\r\n\r\n", 501, "not_implemented"),
        (b"GET * HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
    ],
)
def test_twisted_webs_own_answers_are_json(
    served: Served, request_bytes: bytes, status: int, code: str
) -> None:
    (answer,) = served.exchange(request_bytes)
    assert answer[0] == status and error_of(answer) == code, answer


def test_a_form_body_is_not_parsed(served: Served) -> None:
    """/push's `c` is the query's: a form body does not change it (nor fail as a form)."""
    body = b"c=elsewhere"
    for ctype in (b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=x"):
        request = (
            b"POST /push?c=here HTTP/1.1\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (ctype, len(body), body)
        )
        for split in (False, True):
            (answer,) = served.exchange(request, split)
            assert answer[0] == 200 and answer[2].startswith(b"S|"), answer
    assert served.taken == 2


# -- Expect: 100-continue


def test_an_over_limit_body_announced_with_expect_gets_413_at_once(served: Served) -> None:
    channel, transport = served.connect()
    channel.dataReceived(
        b"POST /channels/big HTTP/1.1\r\nHost: pushd\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % (MAX_MESSAGE_SIZE + 1)
    )
    (answer,) = answers(transport.value())
    assert answer[0] == 413 and error_of(answer) == "too_large"
    assert answer[1]["connection"] == "close" and transport.disconnecting
    # A client that sends its body anyway changes nothing.
    channel.dataReceived(b"x" * (MAX_MESSAGE_SIZE + 1))
    assert len(answers(transport.value())) == 1 and served.published == []


def test_a_body_within_the_limit_gets_100_continue(served: Served) -> None:
    channel, transport = served.connect()
    channel.dataReceived(
        b"POST /channels/ok HTTP/1.1\r\nHost: pushd\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5\r\n\r\n"
    )
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    channel.dataReceived(b"hello")
    got = answers(transport.value())
    assert [a[0] for a in got] == [100, 200] and served.published == [("ok", b'"hello"')]


# -- stopping


def test_a_request_after_the_stop_gets_503_before_the_broker(served: Served) -> None:
    channel, transport = served.connect()
    channel.dataReceived(post("s", b"1"))
    served.site.begin_stop(1.0)
    for request in (post("s", b"2"), b"GET /health HTTP/1.1\r\n\r\n"):
        channel, transport = served.connect()
        channel.dataReceived(request)
        (answer,) = answers(transport.value())
        assert answer[0] == 503 and error_of(answer) == "shutting_down"
        assert answer[1]["connection"] == "close" and transport.disconnecting
    assert served.published == [("s", b"1")]


def test_a_request_on_a_kept_alive_connection_after_the_stop_gets_503(served: Served) -> None:
    channel, transport = served.connect()
    channel.dataReceived(post("s", b"1"))
    served.site.begin_stop(1.0)
    channel.dataReceived(post("s", b"2"))
    first, second = answers(transport.value())
    assert first[0] == 200 and "connection" not in first[1]
    assert second[0] == 503 and error_of(second) == "shutting_down"
    assert second[1]["connection"] == "close" and transport.disconnecting
    assert served.published == [("s", b"1")]


@pytest.mark.parametrize("split", [False, True], ids=["hot-path", "twisted-web"])
def test_a_publish_in_flight_at_the_stop_gets_its_answer_then_the_connection_closes(
    served: Served, split: bool
) -> None:
    served.pending = []
    channel, transport = served.connect()
    request = post("s", b"1")
    for piece in [request[n : n + 1] for n in range(len(request))] if split else [request]:
        channel.dataReceived(piece)
    assert len(served.pending) == 1
    served.site.begin_stop(1.0)
    gone = served.site.channels_gone()
    channel.dataReceived(post("s", b"2"))  # pipelined after the last answer: not read
    assert transport.value() == b"" and not gone.called
    served.release()
    (answer,) = answers(transport.value())
    assert answer[0] == 200 and answer[1]["connection"] == "close"
    assert transport.disconnecting and served.published == [("s", b"1")]
    assert served.taken == (0 if split else 1)
    channel.connectionLost(None)
    assert gone.called


def test_an_idle_connection_gets_a_moment_then_is_closed(served: Served) -> None:
    channel, transport = served.connect()
    channel.dataReceived(post("s", b"1"))
    served.site.begin_stop(1.0)
    gone = served.site.channels_gone()
    served.clock.advance(0.5)
    assert not transport.disconnecting
    served.clock.advance(0.6)
    assert transport.disconnecting and len(answers(transport.value())) == 1
    channel.connectionLost(None)
    assert gone.called


def test_a_connection_gone_while_its_publish_waits_gets_nothing_more(served: Served) -> None:
    """The answer of a publish whose client left is dropped: nothing is written,
    no deadline is left behind."""
    served.pending = []
    channel, transport = served.connect()
    channel.dataReceived(post("s", b"1"))
    channel.connectionLost(None)
    transport.clear()
    served.release()
    assert transport.value() == b"" and served.published == [("s", b"1")]
    assert not [c for c in served.clock.getDelayedCalls() if c.func == channel._too_slow]
