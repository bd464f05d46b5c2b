"""The producers' hot path: `POST /channels/{channel}` and `POST /push?c=`,
answered without twisted.web.

twisted.web spends most of a small publish on itself: a Request object, its
headers parsed through the email package, a Deferred chain, a resource
traversal. A producer's publish is usually one whole request in one read (or
several, pipelined). When it is exactly that (HTTP/1.1, Content-Length, nothing
unusual, allowed, valid), `FastPublish` answers it here; anything else,
including every error a producer can cause, goes to twisted.web as if this
module did not exist, so the contract is answered in one place. Only the
broker's answer (the id, 503, 504, 422) is written here.

Strict: each request is checked by llhttp (httptools), which refuses what RFC
9110 and 9112 refuse (NUL, CR or LF alone, other control bytes, a bad name
character, obs-fold, a malformed Content-Length). What it refuses, and every
request this module does not take whole, goes to twisted.web, where
pushd.web.channel.PushdChannel applies the same grammar (`bad_field_line`), so one
request never gets one answer in one read and another in two.
"""

from __future__ import annotations

import re
import time
from functools import lru_cache
from typing import Any

from httptools import HttpRequestParser
from twisted.logger import Logger
from twisted.web.http import datetimeToString

from pushd.auth import client_host
from pushd.broker import BrokerUnavailable, IdempotencyKeyReused, OutcomeUnknown, Published
from pushd.message import data_from_body, dump_json, is_channel
from pushd.web import errors
from pushd.web.batch import push_data, push_entry
from pushd.web.producer import IDEMPOTENCY_KEY_MAX, Producing

log = Logger()

_CHANNELS = b"POST /channels/"
_PUSH = b"POST /push?c="
_HEAD = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\n%s\r\n"
_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"
_NO_LISTS = b'Warning: 299 pushd "memory broker: no Redis lists kept"\r\n'
_CLOSE = b"Connection: close\r\n"
# Headers whose presence sends a request down the full path (Origin: a browser's,
# whose CORS and origin check are the full path's).
_UNUSUAL = frozenset((b"transfer-encoding", b"expect", b"upgrade", b"origin"))
#: Header fields a request may have, on both paths (as Apache's LimitRequestFields).
MAX_HEADERS = 100
# RFC 9110 5.1, 5.5: field-name ":" OWS field-value OWS; a name is a token, a
# value holds VCHAR, obs-text, SP and HTAB only (no NUL, CR, LF or other CTL).
_FIELD_LINE = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*")


def bad_field_line(line: bytes) -> bool:
    """True when a header line (without its CRLF) is outside RFC 9110's grammar."""
    return _FIELD_LINE.fullmatch(line) is None


class _Quiet:
    """No callbacks: llhttp only checks the bytes (each callback into Python
    costs more than reading the few header lines again)."""

    __slots__ = ()


_QUIET = _Quiet()


@lru_cache(maxsize=4096)
def _answer_head(channel: str) -> bytes:
    """`{"channel":<channel>,"id":"` of the answer: the same for every publish there."""
    return b'{"channel":' + dump_json(channel) + b',"id":"'


class Request:
    """One publish taken on the hot path; `body` is kept for `/push` only;
    `end` is where the request ends in the bytes it was parsed from."""

    __slots__ = ("body", "channel", "data", "end", "key", "started")

    def __init__(
        self, channel: str, data: bytes, key: str | None, body: bytes | None, end: int
    ) -> None:
        self.channel = channel
        self.data = data
        self.key = key
        self.body = body
        self.end = end
        self.started = time.monotonic()


class FastPublish:
    """The hot path of one site. `tried` counts the requests it looked at (those
    starting as a publish), `taken` those it took (tests read both); `closing`
    (the node is stopping) adds `Connection: close` to its answers."""

    tried = 0
    taken = 0
    closing = False

    def __init__(self, producing: Producing, clock: Any) -> None:
        self._p = producing
        self._clock = clock
        self._max_size = producing.config.max_message_size
        self._max_head = producing.config.max_header_size
        self._published = producing.metrics.published.labels("channels")
        self._pushed = producing.metrics.published.labels("push")
        self._event_list = producing.config.push_event_list
        self._seconds = producing.metrics.publish_seconds
        self._date = (0, b"")

    def parse(self, data: bytes, start: int, peer: Any) -> Request | None:
        """The publish at `data[start:]`, whole and valid; None for anything else.
        Bytes after it (pipelined requests) are left for the caller."""
        if data.startswith(_CHANNELS, start):
            prefix, push = len(_CHANNELS) - 5, False  # the target from its "/"
        elif data.startswith(_PUSH, start):
            prefix, push = len(_PUSH) - 5, True
        else:
            return None
        self.tried += 1
        head_end = data.find(b"\r\n\r\n", start)
        if head_end < 0:
            return None
        head_end += 4
        if head_end - start > self._max_head:
            return None  # 414 or 431 (pushd.web.channel)
        line_end = data.find(b"\r\n", start)
        if not data.startswith(b" HTTP/1.1", line_end - 9):
            return None
        try:
            channel = data[start + 5 + prefix : line_end - 9].decode("ascii")
        except UnicodeDecodeError:
            return None
        # Also refuses "/history", "&more", "%xx" (and "+", a space in a query).
        if not is_channel(channel) or (push and ("+" in channel or "#" in channel)):
            return None
        lines = data[line_end + 2 : head_end - 4].split(b"\r\n")
        if len(lines) > MAX_HEADERS:
            return None
        headers: dict[bytes, bytes] = {}
        for line in lines:
            name, _, value = line.partition(b":")
            name = name.lower()
            if name in headers or name in _UNUSUAL:
                return None
            headers[name] = value.strip(b" \t")
        if headers.get(b"connection", b"keep-alive").lower() != b"keep-alive":
            return None
        length = headers.get(b"content-length")
        if length is None or not length.isdigit():
            return None
        end = head_end + int(length)
        if end > len(data):
            return None  # a body in several reads
        body = data[head_end:end]
        if len(body) > self._max_size:
            return None
        auth = self._p.auth
        forwarded = headers.get(b"x-forwarded-for")
        if auth.refusal(
            headers.get(b"authorization"),
            lambda: client_host(
                peer, forwarded.decode("latin-1") if forwarded else None, auth.trusted_proxies
            ),
            forwarded,
        ):
            return None
        key = headers.get(b"idempotency-key")
        if key is not None:
            key_text = key.decode("latin-1")
            if len(key_text) > IDEMPOTENCY_KEY_MAX or not key_text.isprintable() or not key_text:
                return None
        if push:
            if key is not None:
                return None
            try:
                message = push_data(body)
            except ValueError:
                return None
            request = Request(channel, message, None, body, end)
        else:
            try:
                ctype = headers.get(b"content-type", b"").decode("latin-1")
                message = data_from_body(body, ctype)
            except ValueError:
                return None
            request = Request(channel, message, None if key is None else key_text, None, end)
        # Last, the whole request through llhttp (a new parser each time, so no
        # state carries over): what it refuses, twisted.web refuses too.
        try:
            HttpRequestParser(_QUIET).feed_data(memoryview(data)[start:end])
        except Exception:  # HttpParserError and its kin
            return None
        return request

    def publish(self, request: Request, answer: Any) -> None:
        """Publish; `answer(bytes)` gets the whole HTTP response."""
        self.taken += 1
        if request.body is not None:
            self._push(request, answer)
            return

        def published(result: Published) -> None:
            self._counted(self._published, request)
            body = _answer_head(request.channel) + result.id.encode() + b'"}'
            answer(self._response(200, b"OK", _JSON, body))

        d = self._p.broker.publish(request.channel, request.data, request.key)
        d.addCallbacks(published, self._failed, errbackArgs=(request, answer, False))

    def _push(self, request: Request, answer: Any) -> None:
        assert request.body is not None
        ms, request_id, entry = push_entry(request.body)

        def pushed(result: tuple[bool, Published]) -> None:
            self._counted(self._pushed, request)
            body = f"S|{ms}|{request_id}".encode()
            answer(self._response(200, b"OK", _TEXT, body, b"" if result[0] else _NO_LISTS))

        d = self._p.broker.push(request.channel, entry, self._event_list, request.data)
        d.addCallbacks(pushed, self._failed, errbackArgs=(request, answer, True))

    def _counted(self, counter: Any, request: Request) -> None:
        """As Producing.publish counts and times a publish."""
        counter.inc()
        self._seconds.observe(time.monotonic() - request.started)

    def _failed(self, failure: Any, request: Request, answer: Any, push: bool) -> None:
        if failure.check(BrokerUnavailable):
            (status, code, text), reason = errors.UNAVAILABLE, b"Service Unavailable"
            if push:
                text = "redis unavailable"
        elif failure.check(OutcomeUnknown):
            (status, code, text), reason = errors.OUTCOME_UNKNOWN, b"Gateway Timeout"
            if push:
                text = "redis did not answer: outcome unknown"
        elif failure.check(IdempotencyKeyReused):
            (status, code, text), reason = errors.KEY_REUSED, b"Unprocessable Entity"
        else:
            log.failure("publishing to {channel} failed", failure, channel=request.channel)
            status, code, text = 500, "internal", "internal error"
            reason = b"Internal Server Error"
        if push:
            answer(self._response(status, reason, _TEXT, f"F|{text}".encode()))
        else:
            body = dump_json({"error": code, "message": text})
            answer(self._response(status, reason, _JSON, body))

    def _response(
        self, status: int, reason: bytes, ctype: bytes, body: bytes, extra: bytes = b""
    ) -> bytes:
        now = int(self._clock.seconds())
        if self._date[0] != now:
            self._date = (now, datetimeToString(now))
        if self.closing:
            extra += _CLOSE
        return _HEAD % (status, reason, ctype, len(body), self._date[1], extra) + body
