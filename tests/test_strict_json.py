"""Strict JSON everywhere (the contract; issue 13, point 2).

pushd reads and writes RFC 8259 JSON only: it never emits NaN or Infinity, and
a producer's number that does not fit a double (1e400, which a lenient parser
reads as infinity) is refused with 400 `bad_json` on every way in: a publish,
a batch line, a client's publish frame. Numbers that fit are relayed exactly,
big integers included.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import pytest_twisted
import treq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pushd.message import data_from_body, data_json, dump_json, load_json
from tests.support import SECRET, StartPushd, token

# -- the functions


def _refuse(name: str) -> Any:
    raise AssertionError(f"{name} in pushd's output")


def strict_loads(raw: bytes) -> Any:
    """Another strict parser (the stdlib's, NaN/Infinity refused): what pushd writes must pass."""
    return json.loads(raw, parse_constant=_refuse)


# Strict JSON values: big integers, finite floats, any Unicode text (no lone surrogates).
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_strict_json_round_trips_exactly(value: Any) -> None:
    out = dump_json(value)
    assert isinstance(out, bytes) and b"\n" not in out
    assert load_json(out) == value
    assert load_json(out.decode()) == value
    assert strict_loads(out) == value
    assert data_json(value) == out


@settings(max_examples=200)
@given(values, st.sampled_from([None, 0, 2, "\t"]))
def test_any_spelling_of_strict_json_is_read(value: Any, indent: Any) -> None:
    text = json.dumps(value, indent=indent, ensure_ascii=bool(indent))
    assert load_json(text) == value
    assert load_json(text.encode()) == value
    assert strict_loads(data_from_body(text.encode(), "application/json")) == value


non_finite = st.sampled_from([math.inf, -math.inf, math.nan])


@settings(max_examples=200)
@given(values, non_finite)
def test_non_finite_numbers_are_refused(value: Any, bad: float) -> None:
    # NaN / Infinity / -Infinity somewhere in the value, as lenient encoders write them.
    text = json.dumps([value, {"x": bad}])
    with pytest.raises(ValueError):
        load_json(text)
    with pytest.raises(ValueError, match="bad_json"):
        data_from_body(text.encode(), "application/json")


@settings(max_examples=200)
@given(
    st.integers(min_value=1, max_value=10**20),
    st.integers(min_value=309, max_value=100_000),
    st.sampled_from(["", "-"]),
    st.sampled_from(["e", "E", "e+"]),
    values,
)
def test_numbers_past_a_double_are_refused(
    mantissa: int, exponent: int, sign: str, e: str, value: Any
) -> None:
    big = f"{sign}{mantissa}{e}{exponent}"
    assert math.isinf(float(big))
    for text in (big, f'{{"x": {big}}}', f"[{json.dumps(value)}, {big}]"):
        with pytest.raises(ValueError):
            load_json(text)
        with pytest.raises(ValueError, match="bad_json"):
            data_from_body(text.encode(), "application/json")


@settings(max_examples=200)
@given(st.integers().filter(lambda n: abs(n) >= 2**62) | st.integers(min_value=-(10**60)))
def test_big_integers_are_relayed_exactly(n: int) -> None:
    body = f'{{"n": {n}}}'.encode()
    assert load_json(body) == {"n": n}
    assert data_from_body(body, "application/json") == b'{"n":%d}' % n


json_ish = st.lists(
    st.sampled_from(['{"a":', "[", "]", "}", ",", "1e400", "-0", "1.5", '"\\ud800"', "NaN"])
    | st.text(max_size=5)
    | st.integers().map(str),
    max_size=12,
).map("".join)


@settings(max_examples=400)
@given(st.binary(max_size=64) | json_ish.map(str.encode) | json_ish)
def test_any_input_is_read_or_refused_with_a_value_error(raw: str | bytes) -> None:
    try:
        value = load_json(raw)
    except ValueError:
        return
    # What is read can be written back as strict JSON (escaped lone surrogates included).
    assert load_json(dump_json(value)) == value
    strict_loads(dump_json(value))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('"\\ud800"', "\ud800"),  # an escaped lone surrogate is JSON text
        ('{"a": 1, "a": 2}', {"a": 2}),  # duplicate keys: the last one, as JSON.parse
        (" \t\r\n[1] \t\r\n", [1]),  # JSON whitespace around the value
        ("1e-400", 0.0),  # underflow is a double: zero
        ("18446744073709551616", 2**64),
        ("-9223372036854775809", -(2**63) - 1),
        ("1732521234567890123", 1732521234567890123),  # a timestamp in ns: 19 digits, fast path
        ('"12345678901234567890123"', "12345678901234567890123"),
        ("[" * 254 + "]" * 254, json.loads("[" * 254 + "]" * 254)),
    ],
)
def test_reads(text: str, expected: Any) -> None:
    assert load_json(text) == expected
    assert load_json(text.encode()) == expected


@pytest.mark.parametrize(
    "text",
    [
        "NaN",
        "-NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        "-1e400",
        "[1, 2e308]",
        "\ufeff{}",  # a BOM
        "{} x",
        "",
        "{'a': 1}",
        '"\x00"',  # a raw control character in a string
        "[" * 1025 + "]" * 1025,
        "[" * 30000 + "]" * 30000,
    ],
)
def test_refusals_are_value_errors(text: str) -> None:
    with pytest.raises(ValueError):
        load_json(text)
    with pytest.raises(ValueError):
        load_json(text.encode())


def test_lone_surrogates_are_written_escaped_but_refused_as_data() -> None:
    assert dump_json({"s": "\ud800"}) == b'{"s":"\\ud800"}'
    with pytest.raises(ValueError):
        data_json({"s": "\udc00"})
    with pytest.raises(ValueError, match="bad_json"):
        data_from_body(b'"\\ud800"', "application/json")


def test_nesting_past_what_can_be_written_is_refused() -> None:
    deep = "[" * 500 + "]" * 500  # past orjson's writer (254): the exact encoder writes it
    assert data_from_body(deep.encode(), "application/json") == deep.encode()
    deeper = "[" * 1024 + "]" * 1024  # read, but not written: refused, not a crash
    with pytest.raises(ValueError, match="bad_json"):
        data_from_body(deeper.encode(), "application/json")


def test_text_bodies_and_bad_utf8() -> None:
    assert data_from_body(b"NaN", "text/plain") == b'"NaN"'
    assert data_from_body(b"1e400", None) == b'"1e400"'
    with pytest.raises(ValueError, match="bad_text"):
        data_from_body(b'"caf\xe9"', "application/json")
    with pytest.raises(ValueError, match="bad_text"):
        data_from_body(b"caf\xe9", "text/plain")


# -- over HTTP and WebSocket: every way in refuses, nothing is published

JSON = {"content-type": ["application/json"]}
NON_FINITE_BODIES = [
    b"1e400",
    b"-1e400",
    b'{"x": 1e400}',
    b"[1, -1E+400]",
    b"NaN",
    b'{"x": NaN}',
    b"Infinity",
    b"[-Infinity]",
]


async def _subscriber(pushd: Any, channel: str = "news") -> Any:
    client = await pushd.connect(f"?channel={channel}")
    assert (await client.next(5))["type"] == "subscribed"
    return client


async def _error_of(response: Any) -> str:
    body = json.loads(await response.content())
    assert response.code == 400, body
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    return body["error"]


@pytest_twisted.ensureDeferred
async def test_publish_refuses_non_finite_numbers(start_pushd: StartPushd) -> None:
    pushd = await start_pushd()
    client = await _subscriber(pushd)
    for body in NON_FINITE_BODIES:
        assert await _error_of(await pushd.post("news", body, headers=JSON)) == "bad_json", body
        # +json types are JSON too
        ld = {"content-type": ["application/ld+json"]}
        assert await _error_of(await pushd.post("news", body, headers=ld)) == "bad_json", body
    await client.nothing_more()  # nothing was published
    # What fits is relayed exactly, past 64 bits too.
    big = b'{"n":123456789012345678901234567890,"f":1.5e308,"t":1732521234567890123}'
    msg_id = await pushd.publish("news", json.loads(big))
    frame = await client.next(5)
    assert frame["id"] == msg_id and frame["data"] == json.loads(big)
    await client.close()


@pytest_twisted.ensureDeferred
async def test_batches_refuse_non_finite_numbers_whole(start_pushd: StartPushd) -> None:
    pushd = await start_pushd()
    client = await _subscriber(pushd)
    url = f"{pushd.url}/publish"
    good = b'{"channel":"news","data":1}'
    for data in NON_FINITE_BODIES:
        one = b'{"channels":["news"],"data":' + data + b"}"
        response = await treq.post(url, one, headers=JSON, persistent=False)
        assert await _error_of(response) == "bad_json", data
        lines = good + b"\n" + b'{"channel":"news","data":' + data + b"}\n" + good + b"\n"
        ndjson = {"content-type": ["application/x-ndjson"]}
        response = await treq.post(url, lines, headers=ndjson, persistent=False)
        assert await _error_of(response) == "bad_json", data
    await client.nothing_more()  # the good lines were not published either
    await client.close()


@pytest_twisted.ensureDeferred
async def test_publish_frames_refuse_non_finite_numbers(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(token_secret=SECRET)
    subscriber = await pushd.connect(f"?channel=pub.x&token={token(None, ['pub.x'])}")
    assert (await subscriber.next(5))["type"] == "subscribed"
    publisher = await pushd.connect(f"?token={token(None, [], ['pub.*'])}")
    for data in NON_FINITE_BODIES:
        publisher.send(b'{"type":"publish","channel":"pub.x","data":' + data + b"}")
        error = await publisher.next(5)
        assert error["type"] == "error" and error["code"] == "bad_json", (data, error)
    await publisher.nothing_more()  # still connected, nothing else said
    await subscriber.nothing_more()  # nothing was published
    publisher.send(b'{"type":"publish","channel":"pub.x","data":{"n":-99999999999999999999999}}')
    frame = await subscriber.next(5)
    assert frame["data"] == {"n": -99999999999999999999999}
    await publisher.close()
    await subscriber.close()


@given(st.one_of(st.text(max_size=40), st.from_regex(r"\s*[\[{\"tfn0-9-].{0,20}", fullmatch=True)))
def test_a_push_body_is_its_json_or_a_json_string_whatever_it_starts_with(text: str) -> None:
    """pushd.web.batch.push_data skips the parse of a body that cannot be JSON:
    the same answer as parsing every body."""
    from pushd.web.batch import push_data

    try:
        expected = data_json(load_json(text))
    except ValueError:
        expected = dump_json(text)
    assert push_data(text.encode("utf-8", "surrogatepass")) == expected


@given(st.lists(st.integers(min_value=-(2**70), max_value=2**70), min_size=1, max_size=5))
def test_a_batchs_big_integers_stay_exact_whatever_line_they_are_on(numbers: list[int]) -> None:
    """parse_batch checks the whole body once for numbers orjson may read
    inexactly (has_long_numbers): a big integer on any line is still exact."""
    from pushd.web.batch import parse_batch

    body = "".join(json.dumps({"channel": "c", "data": {"n": n}}) + "\n" for n in numbers).encode()
    items = parse_batch(body, "application/x-ndjson", 65536)
    assert [json.loads(data)["n"] for _, data in items] == numbers


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_a_batch_line_may_hold_a_unicode_line_separator_in_a_string(separator: str) -> None:
    """NDJSON lines end at LF (or CRLF); U+2028, U+2029 and U+0085 are
    characters a JSON string may hold unescaped, not line ends."""
    from pushd.web.batch import parse_batch

    body = (
        json.dumps({"channel": "c", "data": f"a{separator}b"}, ensure_ascii=False)
        + "\r\n"
        + json.dumps({"channel": "d", "data": 2})
        + "\n"
    ).encode()
    items = parse_batch(body, "application/x-ndjson", 65536)
    assert [(c, json.loads(d)) for c, d in items] == [("c", f"a{separator}b"), ("d", 2)]


def test_a_json_seq_batch_has_a_record_separator_before_each_record() -> None:
    from pushd.web.batch import parse_batch

    body = b'\x1e{"channel":"c","data":1}\n\x1e{"channel":"d","data":"x"}\n'
    items = parse_batch(body, "application/json-seq", 65536)
    assert [(c, json.loads(d)) for c, d in items] == [("c", 1), ("d", "x")]
