"""PushdChannel and the hot path (pushd.web.channel, pushd.web.hotpath) on a
StringTransport: raw request bytes in, response bytes out, time on a
MemoryReactorClock. Complements tests/test_http_strict.py (grammar, parser
errors, stop): here, which requests the hot path takes, that both paths give a
request the same contract answer (errors included, the broker's too), that
any split of a pipelined stream into reads changes no answer, the keep-alive
deadlines and the gentle close.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail

from pushd.broker import BrokerUnavailable, OutcomeUnknown
from tests.test_unit_harness import Node, Response, get, parse_responses, post


def one_read(request: bytes, node: Node | None = None, host: str = "127.0.0.1") -> Response:
    conn = (node or Node()).connect(host)
    conn.send(request)
    return conn.one()


def byte_by_byte(request: bytes, node: Node | None = None, host: str = "127.0.0.1") -> Response:
    conn = (node or Node()).connect(host)
    conn.send(*(request[n : n + 1] for n in range(len(request))))
    return conn.one()


# -- which requests the hot path takes


TAKEN = [
    pytest.param(post("/channels/news", b"hello"), id="text"),
    pytest.param(
        post("/channels/news", b'{"a": 1}', {"Content-Type": "application/json"}), id="json"
    ),
    pytest.param(post("/channels/news", b"x", {"Connection": "keep-alive"}), id="keep-alive"),
    pytest.param(post("/channels/news", b""), id="empty-body"),
    pytest.param(post("/channels/a.b:c@d=e+f-g_h", b"x"), id="every-channel-character"),
    pytest.param(post("/channels/news", b"x", {"Idempotency-Key": "k-1"}), id="idempotency-key"),
    pytest.param(
        post("/channels/news", b"x", {"Content-Type": "application/xml"}), id="other-type"
    ),
    pytest.param(post("/push?c=news", b"hello"), id="push"),
]


@pytest.mark.parametrize("request_bytes", TAKEN)
def test_a_plain_whole_publish_is_taken_by_the_hot_path(request_bytes: bytes) -> None:
    node = Node()
    answer = one_read(request_bytes, node)
    assert answer.status == 200, answer
    assert node.taken() == (1, 1)
    # Nothing of twisted.web's: no Server header, and the same answer otherwise.
    assert answer.header("server") is None
    slow = byte_by_byte(request_bytes)
    assert slow.header("server") is not None
    assert slow.status == answer.status
    assert slow.header("content-type") == answer.header("content-type")
    if answer.header("content-type") == "application/json":
        assert slow.json() == answer.json()


UNUSUAL = [
    pytest.param(post("/channels/news", b"hello", chunked=True), id="chunked"),
    pytest.param(
        post("/channels/news", b"", {"Content-Length": "2", "Expect": "100-continue"}) + b"hi",
        id="expect",
    ),
    pytest.param(post("/channels/news", b"x", {"Origin": "https://app"}), id="origin"),
    pytest.param(post("/channels/news", b"x", {"Upgrade": "h2c"}), id="upgrade"),
    pytest.param(post("/channels/news", b"x", {"X-A": "1", "x-a": "2"}), id="repeated-header"),
    pytest.param(post("/channels/news", b"x", {"Connection": "close"}), id="connection-close"),
    pytest.param(b"POST /channels/news HTTP/1.0\r\nContent-Length: 1\r\n\r\nx", id="http-1.0"),
    pytest.param(b"POST /channels/news HTTP/1.1\r\nHost: pushd\r\n\r\n", id="no-length"),
    pytest.param(post("/channels/news", b"x", {"Content-Length": "+1"}), id="signed-length"),
    pytest.param(post("/channels/dm%23alice", b"x"), id="percent-encoded"),
    pytest.param(post("/channels/news?x=1", b"x"), id="query"),
    pytest.param(post("/push?c=a+b", b"x"), id="push-plus"),
    pytest.param(post("/push?c=news&x=1", b"x"), id="push-more-query"),
    pytest.param(post("/push?c=news", b"x", {"Idempotency-Key": "k"}), id="push-with-key"),
]


@pytest.mark.parametrize("request_bytes", UNUSUAL)
def test_anything_unusual_goes_to_twisted_web(request_bytes: bytes) -> None:
    node = Node()
    conn = node.connect()
    conn.send(request_bytes)
    answers = [r for r in conn.responses() if r.status != 100]
    assert len(answers) == 1, answers
    assert node.taken() == (1, 0)


def test_a_body_split_across_reads_goes_to_twisted_web() -> None:
    node = Node()
    request = post("/channels/news", b"hello")
    conn = node.connect()
    conn.send(request[:-2], request[-2:])
    assert conn.one().status == 200
    assert node.taken() == (1, 0)
    assert node.broker.history("news", "0-0", None).result.messages == [
        ("1700000000000-0", b'"hello"')
    ]


def test_pipelined_requests_split_across_reads_take_the_hot_path_only_when_whole() -> None:
    node = Node()
    stream = post("/channels/a", b"1") + post("/channels/b", b"2") + post("/channels/c", b"3")
    first_end = len(post("/channels/a", b"1"))
    conn = node.connect()
    # The first whole; the second cut in its head (tried, not taken: twisted.web
    # reads it); the third whole after it: once twisted.web is done with the
    # second, the hot path takes the third.
    cut = first_end + 40
    conn.send(stream[:cut], stream[cut:])
    assert [r.json()["channel"] for r in conn.responses()] == ["a", "b", "c"]
    assert [r.header("server") is None for r in conn.responses()] == [True, False, True]
    assert node.taken() == (3, 2)
    # The same stream in one read: all three taken, the same answers.
    node2 = Node()
    conn2 = node2.connect()
    conn2.send(stream)
    assert node2.taken() == (3, 3)
    assert [r.json() for r in conn2.responses()] == [r.json() for r in conn.responses()]


def test_a_client_past_the_loopback_is_never_answered_by_the_hot_path() -> None:
    node = Node()
    answer = one_read(post("/channels/news", b"x"), node, host="10.0.0.1")
    assert answer.contract == (
        403,
        {
            "error": "forbidden",
            "message": "no API key is configured: the producer API answers loopback only",
        },
    )
    assert node.taken() == (1, 0)


def test_a_forwarded_loopback_address_is_believed_only_from_trusted_proxies() -> None:
    spoofed = post("/channels/news", b"x", {"X-Forwarded-For": "127.0.0.1"})
    node = Node()
    assert one_read(spoofed, node, host="10.0.0.1").status == 403
    assert node.taken() == (1, 0)
    # Behind one trusted proxy on the loopback, the client is the address it saw.
    node = Node(trusted_proxies=1)
    assert one_read(post("/channels/news", b"x", {"X-Forwarded-For": "10.9.9.9"}), node).status == (
        403
    )
    assert one_read(
        post("/channels/news", b"x", {"X-Forwarded-For": "127.0.0.1"}), node
    ).status == (200)
    assert node.taken() == (2, 1)


# -- one contract, both paths


def _paths(request: bytes, **options: Any) -> list[tuple[str, Response, tuple[int, int]]]:
    """The answer to `request` in one read (the hot path first) and byte by byte
    (twisted.web alone), each on a node of its own."""
    out = []
    for name, send in (("one-read", one_read), ("byte-by-byte", byte_by_byte)):
        node = Node(**options)
        out.append((name, send(request, node), node.taken()))
    return out


ERRORS = [
    pytest.param(
        post("/channels/news", b"{", {"Content-Type": "application/json"}),
        {},
        400,
        "bad_json",
        id="400-bad-json",
    ),
    pytest.param(
        post("/channels/news", b"NaN", {"Content-Type": "application/json"}),
        {},
        400,
        "bad_json",
        id="400-nan",
    ),
    pytest.param(
        post("/channels/news", b"1e400", {"Content-Type": "application/json"}),
        {},
        400,
        "bad_json",
        id="400-huge-number",
    ),
    pytest.param(post("/channels/news", b"\xff\xfe"), {}, 400, "bad_text", id="400-bad-text"),
    pytest.param(post("/channels/a%20b", b"x"), {}, 400, "bad_channel", id="400-bad-channel"),
    pytest.param(
        post("/channels/news", b"x", {"Idempotency-Key": "k" * 257}),
        {},
        400,
        "bad_idempotency_key",
        id="400-long-key",
    ),
    pytest.param(post("/push?c=", b"x"), {}, 400, None, id="400-push-no-channel"),
    pytest.param(
        post("/channels/news", b"x"), {"api_key": "k"}, 401, "unauthorized", id="401-no-key"
    ),
    pytest.param(
        post("/channels/news", b"x", {"Authorization": "Bearer wrong"}),
        {"api_key": "k"},
        401,
        "unauthorized",
        id="401-wrong-key",
    ),
    pytest.param(post("/nowhere", b"x"), {}, 404, "not_found", id="404"),
    pytest.param(post("/channels/news/elsewhere", b"x"), {}, 404, "not_found", id="404-deeper"),
    pytest.param(
        post("/channels/news/history", b"x"), {}, 405, "method_not_allowed", id="405-history"
    ),
    pytest.param(
        post("/channels/news", b"x", method="PUT"), {}, 405, "method_not_allowed", id="405-put"
    ),
    pytest.param(
        post("/channels/news", b"x" * 11),
        {"max_message_size": 10, "max_batch_size": 10},
        413,
        "too_large",
        id="413",
    ),
    pytest.param(
        post("/channels/news", b"x" * 11),
        {"max_message_size": 10},
        413,
        "too_large",
        id="413-batch-larger",
    ),
]


@pytest.mark.parametrize(("request_bytes", "options", "status", "code"), ERRORS)
def test_an_error_is_the_same_contract_json_on_both_paths(
    request_bytes: bytes, options: dict[str, Any], status: int, code: str | None
) -> None:
    (_, fast, (_, taken)), (_, slow, _) = _paths(request_bytes, **options)
    assert taken == 0  # every error a producer causes is twisted.web's
    assert fast.status == slow.status == status, (fast, slow)
    if code is None:  # /push answers the gateway's text
        assert fast.body == slow.body and fast.body.startswith(b"F|"), fast
        return
    assert fast.header("content-type") == slow.header("content-type") == "application/json"
    assert fast.json() == slow.json()
    assert fast.json()["error"] == code and fast.json()["message"]
    assert fast.header("connection") == slow.header("connection")


def test_post_without_length_publishes_an_empty_message_on_both_paths() -> None:
    """There is no 411: a POST without Content-Length has no body (RFC 9112 6.3)."""
    request = b"POST /channels/news HTTP/1.1\r\nHost: pushd\r\n\r\n"
    (_, fast, _), (_, slow, _) = _paths(request)
    assert fast.contract == slow.contract == (200, {"channel": "news", "id": "1700000000000-0"})


def test_a_reused_idempotency_key_is_the_same_422_on_both_paths() -> None:
    """The hot path answers the broker's 422 itself: as twisted.web does."""
    first = post("/channels/news", b"x", {"Idempotency-Key": "k1"})
    other = post("/channels/news", b"y", {"Idempotency-Key": "k1"})
    answers = {}
    for name, second in (("hot", other), ("web", other.replace(b"HTTP/1.1", b"HTTP/1.1", 1))):
        node = Node()
        conn = node.connect()
        if name == "hot":
            conn.send(first + second)
            assert node.taken() == (2, 2)
        else:
            conn.send(first, *(second[n : n + 1] for n in range(len(second))))
            assert node.taken() == (1, 1)
        ok, refused = conn.responses()
        assert ok.status == 200
        answers[name] = refused
    assert answers["hot"].header("server") is None  # the hot path's own answer
    assert answers["hot"].contract == answers["web"].contract
    assert answers["hot"].contract[0] == 422
    assert answers["hot"].json()["error"] == "idempotency_key_reused"
    # A repeat of the first request answers the first answer again, both ways.
    node = Node()
    conn = node.connect()
    conn.send(first + first, *(first[n : n + 1] for n in range(len(first))))
    a, b, c = conn.responses()
    assert (
        a.contract
        == b.contract
        == c.contract
        == (200, {"channel": "news", "id": "1700000000000-0"})
    )


BROKER_FAILURES = [
    pytest.param(BrokerUnavailable, 503, "unavailable", "redis unavailable", id="503"),
    pytest.param(
        OutcomeUnknown, 504, "outcome_unknown", "redis did not answer: outcome unknown", id="504"
    ),
]


@pytest.mark.parametrize(("error", "status", "code", "push_text"), BROKER_FAILURES)
def test_the_brokers_refusal_is_the_same_answer_on_both_paths(
    error: type[Exception], status: int, code: str, push_text: str
) -> None:
    got: dict[str, dict[str, Response]] = {}
    for name in ("one-read", "byte-by-byte"):
        got[name] = {}
        for target in ("/channels/news", "/push?c=news"):
            node = Node()
            node.broker.publish = lambda *a, **k: fail(error())
            node.broker.push = lambda *a, **k: fail(error())
            send = one_read if name == "one-read" else byte_by_byte
            got[name][target] = send(post(target, b"x"), node)
            assert node.taken()[1] == (1 if name == "one-read" else 0)
    for target in got["one-read"]:
        fast, slow = got["one-read"][target], got["byte-by-byte"][target]
        assert fast.status == slow.status == status
        assert fast.header("content-type") == slow.header("content-type")
        assert fast.body == slow.body
    channels = got["one-read"]["/channels/news"]
    assert channels.json()["error"] == code
    assert got["one-read"]["/push?c=news"].body == f"F|{push_text}".encode()


def test_a_publish_failing_unexpectedly_is_a_json_500_on_the_hot_path() -> None:
    node = Node()
    node.broker.publish = lambda *a, **k: fail(RuntimeError("boom"))
    answer = one_read(post("/channels/news", b"x"), node)
    assert node.taken() == (1, 1)
    assert answer.contract == (500, {"error": "internal", "message": "internal error"})


# -- pipelining: any split into reads, the same answers


def _request_strategy() -> st.SearchStrategy[bytes]:
    channel = st.sampled_from(["a", "b", "news"])
    text = st.binary(max_size=20).filter(lambda b: b"\r" not in b).map(lambda b: b.hex().encode())
    return st.one_of(
        st.builds(lambda c, b: post(f"/channels/{c}", b), channel, text),
        st.builds(
            lambda c, n: post(
                f"/channels/{c}",
                json.dumps({"n": n}).encode(),
                {"Content-Type": "application/json"},
            ),
            channel,
            st.integers(),
        ),
        st.builds(lambda c, b: post(f"/push?c={c}", b), channel, text),
        st.builds(lambda c: get(f"/channels/{c}"), channel),
        st.builds(lambda c: get(f"/channels/{c}/history?since=0-0"), channel),
        st.just(post("/channels/news", b"{", {"Content-Type": "application/json"})),
        st.just(post("/channels/bad%20name", b"x")),
        st.just(get("/nowhere")),
        st.builds(lambda c, b: post(f"/channels/{c}", b, chunked=True), channel, text),
        st.builds(
            lambda c, b, k: post(f"/channels/{c}", b, {"Idempotency-Key": k}),
            channel,
            text,
            st.sampled_from(["k1", "k2"]),
        ),
    )


def _exchange(
    stream: bytes, cuts: list[int], held: str = "never"
) -> tuple[list[tuple[Any, ...]], Node]:
    """The answers to `stream` cut into reads at `cuts`; with `held`, the broker
    answers each publish only after the read ("after-each-read") or once every
    read is in ("at-the-end")."""
    node = Node()
    waiting = _held(node) if held != "never" else []
    conn = node.connect()
    bounds = [0, *sorted(set(cuts)), len(stream)]

    def release() -> None:
        while waiting:
            waiting.pop(0).callback(None)
            node.advance(0)

    for a, b in itertools.pairwise(bounds):
        if b > a:
            conn.send(stream[a:b])
        if held == "after-each-read":
            release()
    release()
    responses, rest = parse_responses(conn.raw())
    assert rest == b""
    return [_comparable(r) for r in responses], node


def _comparable(r: Response) -> tuple[Any, ...]:
    body: Any = r.body
    if r.header("content-type") == "application/json":
        body = json.loads(r.body)
    elif r.body.startswith(b"S|"):
        body = "S|<ms>|<request id>"  # the wall clock and a random id
    return (r.status, r.header("content-type"), r.header("connection"), body)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(_request_strategy(), min_size=1, max_size=6),
    data=st.data(),
)
def test_any_split_of_a_pipelined_stream_gives_the_same_answers(
    requests: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(requests)
    whole, node = _exchange(stream, [])
    assert len(whole) == len(requests)
    cuts = data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=8), label="cuts")
    held = data.draw(st.sampled_from(["never", "after-each-read", "at-the-end"]), label="held")
    split, split_node = _exchange(stream, cuts, held)
    assert split == whole
    # And the same messages stored, in the same order.
    for channel in ("a", "b", "news"):
        assert (
            split_node.broker.history(channel, "0-0", None).result.messages
            == node.broker.history(channel, "0-0", None).result.messages
        )


def test_a_stream_of_plain_publishes_in_one_read_is_all_hot() -> None:
    requests = [post(f"/channels/c{n % 3}", b"%d" % n) for n in range(30)]
    requests += [post("/push?c=p", b"%d" % n) for n in range(5)]
    node = Node()
    conn = node.connect()
    conn.send(b"".join(requests))
    assert node.taken() == (35, 35)
    assert [r.status for r in conn.responses()] == [200] * 35


# -- what arrives while a hot-path publish waits


def _held(node: Node) -> list[Deferred[Any]]:
    held: list[Deferred[Any]] = []
    real = node.broker.publish

    def publish(channel: str, data: bytes, key: str | None = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        held.append(d)
        d.addCallback(lambda _: real(channel, data, key))
        return d

    node.broker.publish = publish
    return held


def test_requests_arriving_while_a_publish_waits_are_answered_in_order_after_it() -> None:
    node = Node()
    held = _held(node)
    conn = node.connect()
    conn.send(post("/channels/a", b"1"))
    assert node.taken() == (1, 1) and conn.raw() == b""
    # A GET for twisted.web, then another publish, in pieces: they queue.
    conn.send(get("/channels/a")[:5], get("/channels/a")[5:] + post("/channels/a", b"2"))
    assert conn.raw() == b""
    held.pop(0).callback(None)
    node.advance(0)
    # The GET sees the first message; the second publish waits its turn.
    got = conn.responses()
    assert [r.status for r in got] == [200, 200]
    assert got[1].json()["last_id"] == "1700000000000-0"
    held.pop(0).callback(None)
    assert [r.json().get("id") for r in conn.responses()] == [
        "1700000000000-0",
        None,
        "1700000000000-1",
    ]


def test_the_head_deadline_waits_for_the_broker_not_the_client() -> None:
    """A request waiting for the broker is not the client's slowness: no 408."""
    node = Node(handshake_timeout=5)
    held = _held(node)
    conn = node.connect()
    conn.send(post("/channels/a", b"1"))
    node.advance(30)
    assert conn.raw() == b"" and not conn.transport.disconnecting
    held.pop().callback(None)
    assert conn.one().status == 200
    # From its first byte on, the next head has the whole deadline again.
    node.advance(4.9)
    assert not conn.transport.disconnecting
    conn.send(b"POST /channels/a HTTP/1.1\r\n")
    node.advance(4.9)
    assert len(conn.responses()) == 1
    node.advance(0.2)
    answers = conn.responses()
    assert answers[-1].contract == (408, {"error": "timeout", "message": "Request Timeout"})
    assert conn.transport.write_closed


def test_a_whole_hot_request_on_a_kept_alive_connection_sets_no_head_deadline() -> None:
    """The hot path takes the request whole: no deadline is started for its
    head (and cancelled at the answer), one timer less a publish."""
    node = Node(handshake_timeout=5)
    held = _held(node)
    conn = node.connect()
    conn.send(post("/channels/a", b"1"))
    held.pop().callback(None)
    assert conn.one().status == 200
    before = {id(call) for call in node.reactor.getDelayedCalls()}
    conn.send(post("/channels/a", b"2"))
    assert node.taken() == (2, 2)
    assert {id(call) for call in node.reactor.getDelayedCalls()} <= before
    held.pop().callback(None)
    assert [r.status for r in conn.responses()] == [200, 200]


def test_a_head_begun_behind_a_waiting_hot_request_has_its_deadline_from_the_answer() -> None:
    node = Node(handshake_timeout=5)
    held = _held(node)
    conn = node.connect()
    conn.send(post("/channels/a", b"1"))
    held.pop().callback(None)
    conn.send(post("/channels/a", b"2") + b"POST /channels/a HTTP/1.1\r\n")
    node.advance(30)  # the broker's wait, not the client's
    assert len(conn.responses()) == 1 and not conn.transport.write_closed
    held.pop().callback(None)
    assert len(conn.responses()) == 2
    node.advance(4.9)
    assert len(conn.responses()) == 2
    node.advance(0.2)
    assert conn.responses()[-1].status == 408


def test_a_head_must_come_within_the_deadline_after_a_hot_answer() -> None:
    node = Node(handshake_timeout=5)
    conn = node.connect()
    node.advance(4)
    conn.send(post("/channels/a", b"1"))  # in time
    node.advance(4)  # 8 s since the connection, 4 since the answer: fine
    assert len(conn.responses()) == 1 and not conn.transport.write_closed
    conn.send(b"POST /ch")
    node.advance(4.9)
    assert len(conn.responses()) == 1
    node.advance(0.2)
    assert conn.responses()[-1].status == 408


# -- closing: gently, after the last answer


def test_a_refused_connection_half_closes_then_is_cut_off_after_the_linger() -> None:
    node = Node()
    conn = node.connect()
    conn.send(b"GARBAGE\r\n\r\n")
    assert conn.one().status == 400
    assert conn.transport.write_closed and not conn.transport.aborted
    # What the client still sends is read and dropped, not answered.
    conn.send(post("/channels/a", b"1"))
    assert len(conn.responses()) == 1
    assert node.broker.history("a", "0-0", None).result.messages == []
    linger = conn.protocol.linger
    node.advance(linger - 0.01)
    assert not conn.transport.aborted
    node.advance(0.02)
    assert conn.transport.aborted


def test_a_client_that_closes_first_leaves_no_timer() -> None:
    node = Node()
    conn = node.connect()
    conn.send(b"GARBAGE\r\n\r\n")
    conn.close()
    assert node.reactor.getDelayedCalls() == []
    assert conn.protocol not in node.site.channels


@pytest.mark.parametrize("split", [False, True], ids=["hot-path", "twisted-web"])
def test_an_idle_keep_alive_connection_is_closed_without_a_word(split: bool) -> None:
    """Between requests no head deadline runs: an idle kept-alive connection
    is closed by the site's timeout (a minute) without an answer, never with
    a 408 that could cross the client's next request."""
    node = Node(handshake_timeout=10)
    conn = node.connect()
    request = post("/channels/a", b"1")
    conn.send(*([request[n : n + 1] for n in range(len(request))] if split else [request]))
    node.advance(59)
    assert len(conn.responses()) == 1 and not conn.transport.write_closed
    node.advance(2)
    assert conn.transport.write_closed
    assert [r.status for r in conn.responses()] == [200]


def test_an_idle_keep_alive_connection_is_kept_for_the_sites_minute() -> None:
    node = Node()
    conn = node.connect()
    conn.send(post("/channels/a", b"1"))
    node.advance(59)
    assert not conn.transport.write_closed and len(conn.responses()) == 1


def test_a_hot_answer_at_the_stop_says_close_and_is_the_last() -> None:
    node = Node()
    held = _held(node)
    conn = node.connect()
    conn.send(post("/channels/a", b"1"))
    node.site.begin_stop(1.0)
    conn.send(post("/channels/a", b"2"))  # after the last answer: never answered
    held.pop().callback(None)
    (answer,) = conn.responses()
    assert answer.status == 200 and answer.header("connection") == "close"
    assert conn.transport.write_closed
    assert held == []  # the second publish never reached the broker


def test_a_new_connection_during_the_stop_is_closed_after_the_grace() -> None:
    node = Node()
    node.site.begin_stop(0.5)
    conn = node.connect()
    node.advance(0.4)
    assert not conn.transport.write_closed
    node.advance(0.2)
    assert conn.transport.write_closed and conn.raw() == b""
    gone = node.site.channels_gone()
    assert not gone.called
    conn.close()
    assert gone.called


# -- Expect: 100-continue


def test_an_expect_body_over_the_message_limit_gets_413_at_once_with_default_batch_size() -> None:
    node = Node(max_message_size=10)  # --max-batch-size stays 1 MiB
    conn = node.connect()
    conn.send(post("/channels/news", b"", {"Content-Length": "100", "Expect": "100-continue"}))
    (answer,) = conn.responses()
    assert answer.contract[0] == 413, answer


def test_an_expect_body_over_every_limit_gets_413_at_once() -> None:
    node = Node(max_message_size=10, max_batch_size=10)
    conn = node.connect()
    conn.send(post("/channels/news", b"", {"Content-Length": "11", "Expect": "100-continue"}))
    (answer,) = conn.responses()
    assert answer.contract == (
        413,
        {"error": "too_large", "message": "the body is larger than --max-message-size"},
    )
    assert answer.header("connection") == "close" and conn.transport.write_closed
    assert node.taken() == (1, 0)


def test_the_history_api_refuses_an_id_of_non_ascii_digits() -> None:
    answer = one_read(get("/channels/a/history?since=%D9%A1-0"))
    assert answer.contract == (
        400,
        {"error": "bad_since", "message": "since must be a message id <ms>-<seq>"},
    )
