"""Channel names, message ids and the envelope: the words of the wire contract.

An envelope is serialised once, where the message enters the system (the broker
that accepted it), and travels as bytes from there: through Redis pub/sub, into
the hub, onto every connection.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from functools import lru_cache
from json.encoder import (  # type: ignore[attr-defined]
    c_encode_basestring,
    c_encode_basestring_ascii,
    c_make_encoder,
)
from typing import Any

import orjson

CHANNEL_RE = re.compile(
    r"[A-Za-z0-9_.:@=+-]{1,128}(#[A-Za-z0-9_.@=+-]{1,64}(,[A-Za-z0-9_.@=+-]{1,64})*)?"
)
ID_RE = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_ID_MAX = 2**64 - 1  # each part of a Redis stream id is 64 bits

_ENVELOPE_HEAD = b'{"type":"message","channel":'


# JSON is strict everywhere (the contract): pushd reads and writes RFC 8259 JSON
# only, never NaN or Infinity, and a number that does not fit a double (1e400)
# is refused where it comes in, so nothing non-finite is ever held to be written.
# orjson does the work; the stdlib's C encoder and scanner take what orjson
# will not, so no value changes on the way through:
# - integers past 64 bits (orjson reads them as floats, losing digits, and will
#   not write them): JSON numbers may be big, and pushd relays them exactly;
# - an escaped lone surrogate (`"\ud800"`): valid JSON text, read as before
#   (a channel name of one is a bad channel), written escaped by dump_json,
#   refused by data_json (no UTF-8 decoder takes it);
# - nesting deeper than orjson writes (254 levels): up to what Python's
#   recursion allows (~900); deeper is refused with ValueError, as past 1024
#   levels on reading.


def _encoder(ensure_ascii: bool) -> Callable[[Any], str]:
    """The stdlib's compact strict encoder (NaN refused), kept: json.JSONEncoder
    makes its C encoder anew on every call."""
    if c_make_encoder is None:
        return json.JSONEncoder(
            ensure_ascii=ensure_ascii, separators=(",", ":"), allow_nan=False
        ).encode
    quote = c_encode_basestring_ascii if ensure_ascii else c_encode_basestring

    def not_json(value: Any) -> Any:
        raise TypeError(f"{type(value).__name__} is not JSON")

    encode = c_make_encoder(None, not_json, quote, None, ":", ",", False, False, False)
    return lambda value: "".join(encode(value, 0))


_compact = _encoder(ensure_ascii=False)
_ascii = _encoder(ensure_ascii=True)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} does not fit a double")
    return value


# An integer is relayed exactly, however long, as long as it fits a double's
# range: past it (a 309-digit integer) a browser's JSON.parse reads Infinity.
_DOUBLE_MAX = int(sys.float_info.max)


def _int_in_range(text: str) -> int:
    value = int(text)
    if -_DOUBLE_MAX <= value <= _DOUBLE_MAX:
        return value
    raise ValueError(f"{text[:20]}... does not fit a double")


_decoder = json.JSONDecoder(
    parse_constant=_refuse_constant, parse_float=_finite, parse_int=_int_in_range
)
# Where orjson may have read an integer as a float (past -2**63 or 2**64 - 1):
# a run of 19 digits or more. Runs inside strings or fractions only send the
# value through the exact scanner, which reads them the same. Found with one
# translate and one substring search: a regex takes five times as long.
_DIGITS_AS_ZERO = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))
_LONG_RUN = b"0" * 19
_DIGITS_KEPT = bytes(b if 48 <= b <= 57 else 32 for b in range(256))
_I64_MAX = b"9223372036854775807"


def has_long_numbers(text: str | bytes) -> bool:
    """Whether `text` has a run of digits orjson may read inexactly (as an
    integer past 64 bits); False lets `load_json` skip that check for any
    part of it (a batch's lines: one check for the whole body)."""
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogatepass")
    if _LONG_RUN not in text.translate(_DIGITS_AS_ZERO):
        return False
    # 19 digits: exact when it fits an int64 (a timestamp in ns does).
    for run in text.translate(_DIGITS_KEPT).split():
        if len(run) > 19 or (len(run) == 19 and run > _I64_MAX):
            return True
    return False


def _load_exact(text: str | bytes) -> Any:
    """The stdlib's C scanner, strict: what orjson refused or could not read exactly."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    text = text.strip(" \t\r\n")
    try:
        value, end = _decoder.scan_once(text, 0)  # type: ignore[attr-defined]
    except StopIteration:
        raise ValueError("not JSON") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if end != len(text):
        raise ValueError("not one JSON value")
    return value


def load_json(text: str | bytes, *, no_long_numbers: bool = False) -> Any:
    """Strict JSON: NaN, Infinity and numbers past a double (1e400) refused,
    nesting past 1024 levels refused; every refusal is a ValueError. Integers
    come back exact, however big. `no_long_numbers`: the caller checked (with
    `has_long_numbers`, on a text holding this one) that no run of digits in
    it could be an integer orjson reads inexactly."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        # Refused, or a lone surrogate orjson will not read: the exact scanner says which.
        return _load_exact(text)
    if not no_long_numbers and has_long_numbers(text):
        return _load_exact(text)
    return value


def is_channel(name: str) -> bool:
    return CHANNEL_RE.fullmatch(name) is not None


def parse_id(text: str) -> tuple[int, int]:
    """`"<ms>-<seq>"` as a tuple that sorts like the ids do; ValueError otherwise."""
    m = ID_RE.fullmatch(text)
    if m is None or int(m.group(1)) > _ID_MAX or int(m.group(2)) > _ID_MAX:
        raise ValueError(f"not a message id: {text!r}")
    return int(m.group(1)), int(m.group(2))


def format_id(ms: int, seq: int) -> str:
    return f"{ms}-{seq}"


def _dumps(value: Any) -> bytes:
    """orjson, or the stdlib's encoder for what orjson will not write (see above).
    UnicodeEncodeError for a lone surrogate: the callers decide what that means."""
    try:
        return orjson.dumps(value)
    except TypeError:
        pass
    try:
        return _compact(value).encode()
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def dump_json(value: Any) -> bytes:
    """Compact strict JSON, UTF-8, no newline inside: safe for NDJSON and SSE
    lines. Values hold no non-finite float (refused on the way in)."""
    try:
        return _dumps(value)
    except UnicodeEncodeError:
        # A lone surrogate (JSON may escape one) has no UTF-8: keep it escaped.
        return _ascii(value).encode()


def data_json(value: Any) -> bytes:
    """A message's data as JSON; ValueError when a string in it is not Unicode
    (a lone surrogate): subscribers would get text no UTF-8 decoder takes."""
    try:
        return _dumps(value)
    except UnicodeEncodeError:
        raise ValueError("a string of the data is not valid Unicode") from None


def data_from_body(body: bytes, content_type: str | None) -> bytes:
    """The `data` of an envelope, as compact JSON, from a producer's body.

    Raises ValueError with a code of the contract ("bad_json", "bad_text").
    """
    ctype = (content_type or "").split(";", 1)[0].strip().lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        try:
            return data_json(load_json(body))
        except ValueError:
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError("bad_text") from None
            raise ValueError("bad_json") from None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("bad_text") from None
    return dump_json(text)


def envelope_prefix(channel: str) -> bytes:
    """Everything of an envelope before the id's value: `{"type":..,"channel":..,"id":`."""
    return _ENVELOPE_HEAD + dump_json(channel) + b',"id":'


def envelope(channel: str, msg_id: str | None, data: bytes) -> bytes:
    ident = b"null" if msg_id is None else b'"' + msg_id.encode() + b'"'
    return envelope_prefix(channel) + ident + b',"data":' + data + b"}"


class Message:
    """One message on its way out to local subscribers.

    `payload` is the envelope, serialised once; `frame` is a slot where a
    transport keeps what it made of the payload (the WebSocket's frame), so
    that is made once per fan-out too.
    """

    __slots__ = ("channel", "frame", "id", "payload")

    def __init__(self, channel: str, msg_id: str | None, payload: bytes) -> None:
        self.channel = channel
        self.id = msg_id
        self.payload = payload
        self.frame: bytes | None = None

    @property
    def messages(self) -> tuple[Message]:
        return (self,)

    @classmethod
    def from_bus(cls, channel: str, payload: bytes) -> list[Message]:
        """What a bus payload on `channel` carries: pushd's own messages when
        it is pushd's bus format (see BUS_MARKER), else one message of foreign
        data with no id."""
        if payload.startswith(BUS_MARKER) and b"\r" not in payload and _is_utf8(payload):
            messages = _own_messages(cls, channel, payload)
            if messages is not None:
                return messages
        elif payload.startswith(PRESENCE_MARKER) and b"\r" not in payload:
            events = _presence_events(channel, payload)
            if events is not None:
                return events
        return [cls.foreign(channel, payload)]

    @classmethod
    def stored(cls, channel: str, msg_id: str, data: bytes) -> Message:
        """A message of the channel's history: its id and data (JSON) as read."""
        return cls(channel, msg_id, envelope(channel, msg_id, data))

    @classmethod
    def foreign(cls, channel: str, payload: bytes) -> Message:
        """Any bytes a process PUBLISHed: data, never trusted. `data` is the
        payload's JSON value when it is strict JSON, else its text (invalid
        UTF-8 replaced); the id is null."""
        data = None
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            text = payload.decode("utf-8", "replace")
        else:
            try:
                data = dump_json(load_json(text))
            except Exception:  # not strict JSON (or nothing pushd can write back): text
                data = None
        if data is None:
            data = dump_json(text)
        return cls(channel, None, envelope(channel, None, data))


# pushd's own bus format: what its Lua scripts (and the memory broker) PUBLISH
# on `<prefix><channel>`. A payload is BUS_MARKER, then one or more envelopes,
# one a line:
#     \x00pushd/1\n{"type":"message","channel":"news","id":"<ms>-<seq>","data":<JSON>}
# A payload is pushd's only if it starts with the marker, holds no CR, is
# UTF-8, and every line starts with the envelope's beginning for the channel it came on
# and a valid id, then `,"data":`, and ends with `}`. Anything else is foreign
# data (Message.foreign), whole. No JSON is parsed here: the fan-out's hot path.

#: The start of every payload pushd publishes on its bus: a NUL (which no text
#: a process PUBLISHes by accident starts with), the format's name and version.
BUS_MARKER = b"\x00pushd/1\n"
_DATA_KEY = b'","data":'


def bus_payload(*envelopes: bytes) -> bytes:
    """pushd's own bus payload for envelopes of one channel."""
    return BUS_MARKER + b"\n".join(envelopes)


@lru_cache(maxsize=4096)
def _line_head(channel: str) -> bytes:
    """How each line of a payload of pushd's on `channel` starts: up to the id's quote."""
    return envelope_prefix(channel) + b'"'


def _is_utf8(payload: bytes) -> bool:
    if payload.isascii():
        return True
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _own_messages(cls: type[Message], channel: str, payload: bytes) -> list[Message] | None:
    """The envelopes of a payload in pushd's bus format, or None when it is not."""
    head = _line_head(channel)
    start = len(head)
    messages = []
    for line in payload[len(BUS_MARKER) :].split(b"\n"):
        end = line.find(_DATA_KEY, start)
        if end < 0 or not line.startswith(head) or not line.endswith(b"}"):
            return None
        try:
            msg_id = line[start:end].decode("ascii")
            parse_id(msg_id)
        except ValueError:  # UnicodeDecodeError is one
            return None
        messages.append(cls(channel, msg_id, line))
    return messages


class PresenceEvent(Message):
    """A member came (`event` b"join") or went (b"leave"): no id, never stored;
    its payload is `{"type":"join"|"leave","channel":..,"member":{..}}`."""

    __slots__ = ("event",)

    def __init__(self, channel: str, event: bytes, payload: bytes) -> None:
        super().__init__(channel, None, payload)
        self.event = event


# Presence events on the bus: PRESENCE_MARKER, then one event object a line
# (presence_event). Parsed and checked whole, unlike messages: they are few,
# and anything else is foreign data, whole.
PRESENCE_MARKER = b"\x00pushd-presence/1\n"
_PRESENCE_KINDS = {"join": b"join", "leave": b"leave"}
_EVENT_KEYS = {"type", "channel", "member"}
_MEMBER_KEYS = {"client", "user", "info"}


def presence_event(kind: bytes, channel: str, member: bytes) -> bytes:
    """One event's JSON; `member` is the member's JSON object."""
    return (
        b'{"type":"' + kind + b'","channel":' + dump_json(channel) + b',"member":' + member + b"}"
    )


def presence_payload(events: list[bytes]) -> bytes:
    """The bus payload of presence events of one channel."""
    return PRESENCE_MARKER + b"\n".join(events)


def _presence_events(channel: str, payload: bytes) -> list[Message] | None:
    events: list[Message] = []
    for line in payload[len(PRESENCE_MARKER) :].split(b"\n"):
        try:
            event = load_json(line)
        except ValueError:
            return None
        if not isinstance(event, dict) or event.keys() != _EVENT_KEYS:
            return None
        kind = event["type"]
        kind = _PRESENCE_KINDS.get(kind) if isinstance(kind, str) else None
        member = event["member"]
        if (
            kind is None
            or event["channel"] != channel
            or not isinstance(member, dict)
            or not member.keys() <= _MEMBER_KEYS
            or not isinstance(member.get("client"), str)
            or not isinstance(member.get("user"), str | None)
        ):
            return None
        events.append(PresenceEvent(channel, kind, line))
    return events


class Burst:
    """Messages of one channel that came in together, handed to subscribers as
    one: a transport writes them at once, in one frame buffer made once."""

    __slots__ = ("channel", "frame", "messages")

    def __init__(self, messages: list[Message]) -> None:
        self.channel = messages[0].channel
        self.messages = messages
        self.frame: bytes | None = None


#: What the hub hands a subscriber.
Delivery = Message | Burst
