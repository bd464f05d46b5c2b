"""The producers' hot path: `POST /channels/{channel}` and `POST /push?c=`,
answered without twisted.web.

twisted.web spends most of a small publish on itself: a Request object, its
headers parsed through the email package, a Deferred chain, a resource
traversal. A producer's publish is usually one whole request in one read. When
it is exactly that (HTTP/1.1, Content-Length, nothing unusual, allowed, valid),
`FastPublish` answers it here; anything else, including every error a producer
can cause, goes to twisted.web as if this module did not exist, so the contract
is answered in one place. Only the broker's answer (the id, or 503) is written
here.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

from twisted.logger import Logger
from twisted.web.http import datetimeToString

from pushd.auth import client_host
from pushd.broker import BrokerUnavailable, Published
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
# Headers whose presence sends a request down the full path.
_UNUSUAL = frozenset((b"transfer-encoding", b"expect", b"upgrade"))


@lru_cache(maxsize=4096)
def _answer_head(channel: str) -> bytes:
    """`{"channel":<channel>,"id":"` of the answer: the same for every publish there."""
    return b'{"channel":' + dump_json(channel) + b',"id":"'


class Request:
    """One publish taken on the hot path; `body` is kept for `/push` only."""

    __slots__ = ("body", "channel", "data", "key", "started")

    def __init__(self, channel: str, data: bytes, key: str | None, body: bytes | None) -> None:
        self.channel = channel
        self.data = data
        self.key = key
        self.body = body
        self.started = time.monotonic()


class FastPublish:
    def __init__(self, producing: Producing, clock: Any) -> None:
        self._p = producing
        self._clock = clock
        self._max_size = producing.config.max_message_size
        self._published = producing.metrics.published.labels("channels")
        self._pushed = producing.metrics.published.labels("push")
        self._event_list = producing.config.push_event_list
        self._seconds = producing.metrics.publish_seconds
        self._date = (0, b"")

    def parse(self, data: bytes, peer: Any) -> Request | None:
        """The publish `data` holds, whole and valid; None for anything else."""
        if data.startswith(_CHANNELS):
            start, push = len(_CHANNELS), False
        elif data.startswith(_PUSH):
            start, push = len(_PUSH), True
        else:
            return None
        head_end = data.find(b"\r\n\r\n")
        line_end = data.find(b"\r\n")
        if head_end < 0:
            return None
        target, _, version = data[start:line_end].partition(b" ")
        if version != b"HTTP/1.1":
            return None
        try:
            channel = target.decode("ascii")
        except UnicodeDecodeError:
            return None
        # Also refuses "/history", "&more", "%xx" (and "+", a space in a query).
        if not is_channel(channel) or (push and ("+" in channel or "#" in channel)):
            return None
        headers: dict[bytes, bytes] = {}
        for line in data[line_end + 2 : head_end].split(b"\r\n"):
            name, colon, value = line.partition(b":")
            name = name.lower()
            if not colon or name in headers or name in _UNUSUAL or name != name.strip():
                return None
            headers[name] = value.strip()
        if headers.get(b"connection", b"keep-alive").lower() != b"keep-alive":
            return None
        body = data[head_end + 4 :]
        length = headers.get(b"content-length")
        if length is None or not length.isdigit() or int(length) != len(body):
            return None  # a body in several reads, or pipelined requests
        if len(body) > self._max_size:
            return None
        auth = self._p.auth
        if auth.refusal(
            headers.get(b"authorization"),
            lambda: client_host(
                peer, headers.get(b"x-forwarded-for", b"").decode("latin-1"), auth.trusted_proxies
            ),
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
            return Request(channel, message, None, body)
        try:
            message = data_from_body(body, headers.get(b"content-type", b"").decode("latin-1"))
        except ValueError:
            return None
        return Request(channel, message, None if key is None else key_text, None)

    def publish(self, request: Request, answer: Any) -> None:
        """Publish; `answer(bytes)` gets the whole HTTP response."""
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
        return _HEAD % (status, reason, ctype, len(body), self._date[1], extra) + body
