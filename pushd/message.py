"""Channel names, message ids and the envelope: the words of the wire contract.

An envelope is serialised once, where the message enters the system (the broker
that accepted it), and travels as bytes from there: through Redis pub/sub, into
the hub, onto every connection.
"""

from __future__ import annotations

import json
import re
from json.encoder import (  # type: ignore[attr-defined]
    c_encode_basestring,
    c_encode_basestring_ascii,
    c_make_encoder,
)
from typing import Any

CHANNEL_RE = re.compile(
    r"[A-Za-z0-9_.:@=+-]{1,128}(#[A-Za-z0-9_.@=+-]{1,64}(,[A-Za-z0-9_.@=+-]{1,64})*)?"
)
ID_RE = re.compile(r"(\d{1,20})-(\d{1,20})")
_ID_MAX = 2**64 - 1  # each part of a Redis stream id is 64 bits

_ENVELOPE_HEAD = b'{"type":"message","channel":'


def _encoder(ensure_ascii: bool) -> Any:
    """Compact JSON. json.JSONEncoder makes its C encoder anew on every call;
    pushd encodes per publish, so it keeps one (no circular check: what it
    encodes comes from JSON or from pushd itself)."""
    if c_make_encoder is None:
        return json.JSONEncoder(ensure_ascii=ensure_ascii, separators=(",", ":")).encode
    quote = c_encode_basestring_ascii if ensure_ascii else c_encode_basestring

    def not_json(value: Any) -> Any:
        raise TypeError(f"{type(value).__name__} is not JSON")

    encode = c_make_encoder(None, not_json, quote, None, ":", ",", False, False, True)
    return lambda value: "".join(encode(value, 0))


_compact = _encoder(ensure_ascii=False)
_ascii = _encoder(ensure_ascii=True)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_decoder = json.JSONDecoder(parse_constant=_refuse_constant)


def load_json(text: str | bytes) -> Any:
    """Strict JSON: NaN and Infinity refused, nesting too deep for Python refused;
    every refusal is a ValueError. Straight through the C scanner: it runs per
    publish, and per line of a batch."""
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


def dump_json(value: Any) -> bytes:
    """Compact JSON, UTF-8, no newline inside: safe for NDJSON and SSE lines."""
    try:
        return _compact(value).encode()
    except UnicodeEncodeError:
        # A lone surrogate (JSON may escape one) has no UTF-8: keep it escaped.
        return _ascii(value).encode()


def data_json(value: Any) -> bytes:
    """A message's data as JSON; ValueError when a string in it is not Unicode
    (a lone surrogate): subscribers would get text no UTF-8 decoder takes."""
    try:
        return _compact(value).encode()
    except UnicodeEncodeError:
        raise ValueError("a string of the data is not valid Unicode") from None


def data_from_body(body: bytes, content_type: str | None) -> bytes:
    """The `data` of an envelope, as compact JSON, from a producer's body.

    Raises ValueError with a code of the contract ("bad_json", "bad_text").
    """
    ctype = (content_type or "").split(";", 1)[0].strip().lower()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("bad_text") from None
    if ctype == "application/json" or ctype.endswith("+json"):
        try:
            return data_json(load_json(text))
        except ValueError:
            raise ValueError("bad_json") from None
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
        self.frame: Any = None

    @property
    def messages(self) -> tuple[Message]:
        return (self,)

    @classmethod
    def from_wire(cls, channel: str, raw: bytes) -> Message:
        """What arrived on the bus: a pushd envelope, or any payload a process PUBLISHed."""
        if raw.startswith(_ENVELOPE_HEAD):
            try:
                value = json.loads(raw)
                return cls(channel, value["id"], raw)
            except (ValueError, KeyError, TypeError):
                pass
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", "replace")
        try:
            data = dump_json(load_json(text))
        except ValueError:
            data = dump_json(text)
        return cls(channel, None, envelope(channel, None, data))

    @classmethod
    def all_from_wire(cls, channel: str, raw: bytes) -> list[Message]:
        """A bus payload may carry several envelopes, one a line (a batch publish:
        one PUBLISH for many messages of a channel; an envelope has no newline)."""
        if raw.startswith(_ENVELOPE_HEAD) and b"\n" in raw:
            return [cls.from_wire(channel, line) for line in raw.split(b"\n") if line]
        return [cls.from_wire(channel, raw)]


class Burst:
    """Messages of one channel that came in together, handed to subscribers as
    one: a transport writes them at once, in one frame buffer made once."""

    __slots__ = ("channel", "frame", "messages")

    def __init__(self, messages: list[Message]) -> None:
        self.channel = messages[0].channel
        self.messages = messages
        self.frame: Any = None


#: What the hub hands a subscriber.
Delivery = Message | Burst
