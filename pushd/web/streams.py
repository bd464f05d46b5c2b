"""Subscribers over plain HTTP: Server-Sent Events (`/sse`) and NDJSON (`/stream`).

Both hold the response open and write server events as they come, through the
same Session as a WebSocket (so recovery with `since` keeps the same promises).

  GET /sse?channel=a&channel=b[&since=<id>][&token=...]   text/event-stream
      id: <id>                 (several channels: an opaque cursor of every
      data: <envelope JSON>     channel's last id, so Last-Event-ID resumes all)

      event: subscribed        (one per channel, before its replay; EventSource
      data: {"type":"subscribed","channel":"a","recovered":true,"position":"<id>"}
                                hands these to listeners of "subscribed")
      event: subscribed        (once every channel is live, its replay sent:
      id: <cursor>              the resume point of every channel, quiet ones
      data: {"type":"subscribed","channels":{"a":"<id>","b":"0-0"}}   included;
                                a channel without history resumes from 0-0)
      : keep-alive             (a comment every --keepalive seconds, 15)

  GET /stream?channel=a                                     application/x-ndjson
      {"type":"subscribed","channel":"a","recovered":false,"position":null}
      {"type":"message","channel":"a","id":"...","data":...}
      (an empty line every --keepalive seconds keeps proxies from timing out
       the stream: readers skip empty lines)

Refusals come before the stream starts, as the producer API's JSON errors:
400 bad channel or since, 401 bad or missing token, 403 a channel not granted
or an origin not allowed, 429 too many connections from the address. A client
that stops reading is cut off once --max-send-buffer bytes wait for it.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from twisted.internet.defer import DeferredList
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from pushd.auth import AuthError, Gate, Grants, token_from
from pushd.broker import Broker
from pushd.hub import Hub
from pushd.limits import SendBound
from pushd.message import Burst, Delivery, dump_json, is_channel, parse_id
from pushd.session import Session
from pushd.web import errors
from pushd.web.errors import ApiError, write_error
from pushd.web.resource import request_host

log = Logger()


def encode_cursor(last: dict[str, str]) -> str:
    """Every channel's last id as one URL-safe Last-Event-ID."""
    raw = json.dumps(last, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(value: str, channels: list[str]) -> dict[str, str]:
    """A Last-Event-ID (or since) as channel -> id; a plain id applies to every channel."""
    try:
        parse_id(value)
        return dict.fromkeys(channels, value)
    except ValueError:
        pass
    try:
        padded = value + "=" * (-len(value) % 4)
        last = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError):
        raise ApiError(*errors.BAD_SINCE) from None
    if not isinstance(last, dict):
        raise ApiError(*errors.BAD_SINCE)
    cursor = {}
    for channel, msg_id in last.items():
        if channel in channels:
            try:
                parse_id(msg_id)
            except (TypeError, ValueError):
                raise ApiError(*errors.BAD_SINCE) from None
            cursor[channel] = msg_id
    return cursor


@implementer(IPushProducer)
class _Stream(SendBound):
    """One open stream: the Session's outlet, the transport's producer."""

    __slots__ = ("_channels", "_last", "_limit", "_on_slow", "_request", "_sse", "session")

    def __init__(
        self, request: Request, sse: bool, limit: int, channels: list[str], on_slow: Any
    ) -> None:
        self._request = request
        self._on_slow = on_slow
        self.replaying = False
        self._sse = sse
        self._limit = limit
        self._paused = False
        self._backlog = 0
        # The channels asked for; on SSE the `id:` resumes them.
        self._channels = channels
        # SSE: each channel's resume point (its position, then its last id), for
        # `id:`: that id itself with one channel, the cursor of all with several.
        self._last: dict[str, str] | None = {} if sse else None
        self.session: Session | None = None

    # -- the session's outlet

    def subscribed(self, channel: str, recovered: bool, position: str | None) -> None:
        event = dump_json(
            {"type": "subscribed", "channel": channel, "recovered": recovered, "position": position}
        )
        if not self._sse:
            self._write(event + b"\n")
            return
        # Not in an `id:` yet: a replay may follow, and a browser cut off before
        # it must resume from where it was. `live` sends the cursor once replayed.
        assert self._last is not None
        self._last[channel] = position or "0-0"
        self._write(b"event: subscribed\ndata: " + event + b"\n\n")

    def live(self) -> None:
        """Every channel asked for is live, its replay sent: one `subscribed`
        event whose `id:` resumes every channel, quiet ones included (a channel
        without history from `0-0`, its beginning)."""
        if self._last is None:
            return
        resume = {c: self._last[c] for c in self._channels if c in self._last}
        if not resume:
            return  # no subscription went through: nothing to resume from
        one = len(self._channels) == 1
        event_id = resume[self._channels[0]] if one else encode_cursor(resume)
        data = dump_json({"type": "subscribed", "channels": resume})
        self._write(b"event: subscribed\nid: " + event_id.encode() + b"\ndata: " + data + b"\n\n")

    def message(self, message: Delivery) -> None:
        if isinstance(message, Burst):
            for one in message.messages:
                self.message(one)
            return
        if not self._sse:
            self._write(message.payload + b"\n")
        elif message.id is None:
            self._write(b"data: " + message.payload + b"\n\n")
        else:
            last = self._last
            assert last is not None
            last[message.channel] = message.id
            if len(self._channels) > 1:
                cursor = encode_cursor(last).encode()
                self._write(b"id: " + cursor + b"\ndata: " + message.payload + b"\n\n")
            elif message.channel == self._channels[0]:
                self._write(b"id: " + message.id.encode() + b"\ndata: " + message.payload + b"\n\n")
            else:
                # The user's personal channel beside one channel: its id would
                # be taken for the channel's own on a reconnect.
                self._write(b"data: " + message.payload + b"\n\n")

    def unsubscribed(self, channel: str) -> None:
        self.end()

    def disconnect(self) -> None:
        self.end()

    def keepalive(self) -> None:
        self._write(b": keep-alive\n\n" if self._sse else b"\n")

    def _write(self, data: bytes) -> None:
        if self._request.finished or self._request._disconnected:
            return
        if self.over(len(data), self._limit):
            log.info("dropping a slow stream consumer")
            self._on_slow()
            self.close()
            transport = self._request.channel.transport
            if transport is not None:
                transport.abortConnection()
            return
        self._request.write(data)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def end(self) -> None:
        self.close()
        _end(self._request)

    def stopProducing(self) -> None:
        self.close()


class StreamResource(Resource):
    """`/sse` (sse=True) or `/stream`."""

    isLeaf = True

    def __init__(
        self,
        hub: Hub,
        broker: Broker,
        gate: Gate,
        config: Any,
        clock: Any,
        metrics: Any,
        sse: bool,
    ) -> None:
        super().__init__()
        self._metrics = metrics
        self._config = config
        self._transport = "sse" if sse else "stream"
        self._trusted_proxies = config.trusted_proxies
        self._hub = hub
        self._broker = broker
        self._gate = gate
        self._max_subscriptions = config.max_subscriptions
        self._max_send_buffer = config.max_send_buffer
        self._keepalive_every = config.keepalive
        self._clock = clock
        self._sse = sse
        self._streams: set[_Stream] = set()
        self._keepalive = LoopingCall(self._beat)
        self._keepalive.clock = clock

    def _beat(self) -> None:
        for stream in tuple(self._streams):
            stream.keepalive()

    def _cors(self, request: Request) -> None:
        origin = request.getHeader(b"origin")
        if origin is not None and self._gate.origins.admits(origin.decode("latin-1")):
            request.setHeader(b"access-control-allow-origin", origin)
            request.setHeader(b"access-control-allow-credentials", b"true")
            request.setHeader(b"vary", b"Origin")

    def render_OPTIONS(self, request: Request) -> bytes:
        self._cors(request)
        request.setHeader(b"access-control-allow-methods", b"GET, OPTIONS")
        request.setHeader(b"access-control-allow-headers", b"Authorization, Last-Event-ID")
        request.setHeader(b"access-control-max-age", b"86400")
        request.setResponseCode(204)
        return b""

    def render_GET(self, request: Request) -> Any:
        self._cors(request)
        try:
            channels, cursor = self._parse(request)
        except ApiError as e:
            write_error(request, e.status, e.code, e.message)
            return NOT_DONE_YET
        token = token_from(_last(request.args or {}, b"token"), _header(request, b"authorization"))
        headers = {
            k.decode("latin-1").lower(): b",".join(v).decode("latin-1")
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        address = request_host(request, self._trusted_proxies)
        d = self._gate.admit(
            address=address,
            token=token,
            headers=headers,
            transport=self._transport,
            channels=channels,
        )
        d.addCallback(self._start, request, channels, cursor, address)
        d.addErrback(self._refused, request)
        return NOT_DONE_YET

    def _parse(self, request: Request) -> tuple[list[str], dict[str, str]]:
        args = request.args or {}
        channels = list(
            dict.fromkeys(c.decode("utf-8", "replace") for c in args.get(b"channel", []))
        )
        if not channels or not all(is_channel(c) for c in channels):
            raise ApiError(*errors.BAD_CHANNEL)
        if len(channels) > self._max_subscriptions:
            raise ApiError(400, "too_many_subscriptions", "too many channels")
        since = (
            _header(request, b"last-event-id")
            or _last(args, b"since")
            or _last(args, b"last_event_id")
        )
        return channels, decode_cursor(since, channels) if since else {}

    def _refused(self, failure: Any, request: Request) -> None:
        error = failure.value
        if isinstance(error, AuthError):
            log.info("stream client refused: {code}", code=error.code, status=error.status)
            write_error(request, error.status, error.code, error.message)
        else:
            log.failure("opening a stream failed", failure)
            write_error(request, 500, "internal", "internal error")

    def _start(
        self,
        grants: Grants,
        request: Request,
        channels: list[str],
        cursor: dict[str, str],
        address: str,
    ) -> None:
        refused = [c for c in channels if not grants.may_subscribe(c)]
        if refused or request._disconnected:
            self._gate.release(address, self._transport)
            if refused:
                self._metrics.refused.labels("forbidden").inc()
                write_error(request, 403, "forbidden", f"not allowed to subscribe to {refused[0]}")
            return
        request.setHeader(
            b"content-type", b"text/event-stream" if self._sse else b"application/x-ndjson"
        )
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        stream = _Stream(request, self._sse, self._max_send_buffer, channels, self._slow_consumer)
        if stream._last is not None:
            stream._last.update(cursor)
        stream.session = Session(self._hub, self._broker, stream)
        request.registerProducer(stream, True)
        self._streams.add(stream)
        if not self._keepalive.running:
            self._keepalive.start(self._keepalive_every, now=False)
        request.write(b": ok\n\n" if self._sse else b"")

        log.info("{transport} client {peer} admitted", transport=self._transport, peer=address)

        def gone(_: object) -> None:
            log.info("{transport} client {peer} gone", transport=self._transport, peer=address)
            stream.close()
            self._streams.discard(stream)
            self._gate.release(address, self._transport)
            if not self._streams and self._keepalive.running:
                self._keepalive.stop()

        request.notifyFinish().addBoth(gone)
        joining = [stream.session.subscribe(channel, cursor.get(channel)) for channel in channels]
        if grants.sub is not None:
            joining.append(stream.session.identify(grants.sub, self._config.personal(grants.sub)))
        # After every `subscribed` (the personal channel's too) and replay.
        DeferredList(joining).addCallback(lambda _: stream.live())
        if grants.expires is not None:
            delay = max(0.0, grants.expires - self._clock.seconds())
            ending = self._clock.callLater(delay, _end, request)
            request.notifyFinish().addBoth(lambda _: ending.active() and ending.cancel())

    def _slow_consumer(self) -> None:
        self._metrics.slow_consumers.labels(self._transport).inc()

    def end_all(self) -> None:
        """End every stream (the service is stopping)."""
        for stream in tuple(self._streams):
            stream.end()


def _end(request: Request) -> None:
    if not request.finished and not request._disconnected:
        request.finish()


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if value else None


def _last(args: dict[bytes, list[bytes]], name: bytes) -> str | None:
    values = args.get(name)
    return values[-1].decode("utf-8", "replace") if values else None
