"""What the plain-HTTP subscriber streams share: SSE (pushd.transports.sse)
and NDJSON (pushd.transports.ndjson).

Both hold the response open and write server events as they come, through the
same Session as a WebSocket (so recovery with `since` keeps the same promises).
A stream's `since` (or SSE's Last-Event-ID) is one message id for every channel
or a cursor of each channel's last id (`encode_cursor`).

Refusals come before the stream starts, as the producer API's JSON errors:
400 bad channel or since, 401 bad or missing token, 403 a channel not granted
or an origin not allowed, 429 too many connections from the address. A client
that stops reading is cut off once --max-send-buffer bytes wait for it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from pushd.auth import AuthError, Gate, Grants, token_from
from pushd.broker import Broker
from pushd.config import Config
from pushd.hub import Hub
from pushd.limits import SendBound
from pushd.message import Delivery, is_channel, parse_id
from pushd.presence import Presence
from pushd.sending import write_now
from pushd.session import Session
from pushd.waiting import OpenConnections
from pushd.web import errors
from pushd.web.channel import let_go
from pushd.web.errors import ApiError, write_error
from pushd.web.resource import request_host

log = Logger()


#: The cursor's version, its first field: `1.<check>.<id>.<id>...`.
_CURSOR_V1 = "1"


def encode_cursor(last: dict[str, str], channels: list[str]) -> str:
    """Every channel's last id as one URL-safe Last-Event-ID, compact enough for
    --max-subscriptions channels of long names: the ids alone, in the order of
    `channels` (the request's: EventSource reconnects to the same URL), after a
    check of that channel list. An id is written `<ms>` when its seq is 0, a
    channel without a resume point as nothing."""
    ids = (_compact_id(last.get(channel)) for channel in channels)
    return ".".join((_CURSOR_V1, _channels_check(channels), *ids))


def decode_cursor(value: str, channels: list[str]) -> dict[str, str]:
    """A Last-Event-ID (or since) as channel -> id; a plain id applies to every
    channel. A cursor of other channels (another URL's) resumes none of them;
    a malformed one is ApiError bad_since."""
    try:
        parse_id(value)
        return dict.fromkeys(channels, value)
    except ValueError:
        pass
    if "." in value:  # never in the former cursor (base64url)
        return _decode_v1(value, channels)
    return _decode_json(value, channels)


def _channels_check(channels: list[str]) -> str:
    digest = hashlib.sha256("\n".join(channels).encode("utf-8", "surrogatepass")).digest()
    return base64.urlsafe_b64encode(digest[:6]).decode()


def _compact_id(msg_id: str | None) -> str:
    if msg_id is None:
        return ""
    return msg_id[:-2] if msg_id.endswith("-0") else msg_id


def _decode_v1(value: str, channels: list[str]) -> dict[str, str]:
    version, check, *tokens = value.split(".")
    if version != _CURSOR_V1 or not tokens:
        raise ApiError(*errors.BAD_SINCE)
    ids: list[str | None] = []
    for token in tokens:
        msg_id = None if not token else token if "-" in token else token + "-0"
        if msg_id is not None:
            try:
                parse_id(msg_id)
            except ValueError:
                raise ApiError(*errors.BAD_SINCE) from None
        ids.append(msg_id)
    # The check "_": a client that builds the cursor with the URL (pushd.js)
    # vouches that the ids follow this URL's channels; a server-made cursor is
    # checked, since a browser may send it back to another URL.
    if len(ids) != len(channels) or check not in ("_", _channels_check(channels)):
        return {}  # another URL's channels: none resumes, never from another's id
    return {
        channel: msg_id for channel, msg_id in zip(channels, ids, strict=True) if msg_id is not None
    }


def _decode_json(value: str, channels: list[str]) -> dict[str, str]:
    """The cursor before 1 (base64url of {channel: id}): what browsers hold
    across an upgrade, and what pushd.js sends as `?since=`."""
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
class Stream(SendBound):
    """One open stream: the Session's outlet, the transport's producer. Its
    format is a subclass's (SseStream, NdjsonStream)."""

    __slots__ = ("_channels", "_chunked", "_limit", "_on_slow", "_transport", "session")

    def __init__(self, chunked: bool, limit: int, channels: list[str], on_slow: Any) -> None:
        #: The connection's transport once the stream holds it (`StreamConnection`).
        self._transport: Any = None
        #: HTTP/1.1: each write is a chunk; HTTP/1.0: the body ends with the connection.
        self._chunked = chunked
        self._on_slow = on_slow
        self.replaying = False
        self._limit = limit
        self._paused = False
        self._backlog = 0
        # The channels asked for; on SSE the `id:` resumes them.
        self._channels = channels
        self.session: Session | None = None

    # -- the session's outlet, in the stream's format

    def subscribed(self, channel: str, recovered: bool, position: str | None) -> None:
        raise NotImplementedError

    def live(self) -> None:
        """Every channel asked for is live, its replay sent."""

    def message(self, message: Delivery) -> None:
        raise NotImplementedError

    def keepalive(self) -> None:
        raise NotImplementedError

    # -- the same for every stream

    def unsubscribed(self, channel: str) -> None:
        self.end()

    def disconnect(self) -> None:
        self.end()

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if not data or transport is None or transport.disconnecting or not transport.connected:
            return  # (an empty chunk would end the body)
        if self.over(len(data), self._limit):
            log.info("dropping a slow stream consumer")
            self._on_slow()
            self.close()
            transport.abortConnection()
            return
        write_now(transport, b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def end(self) -> None:
        """The stream is over (the application's doing, or the token's expiry,
        or the node stops): its last chunk, and the connection closes."""
        self.close()
        transport = self._transport
        if transport is not None and transport.connected and not transport.disconnecting:
            if self._chunked:
                write_now(transport, b"0\r\n\r\n")
            transport.loseConnection()

    def stopProducing(self) -> None:
        self.close()


class StreamConnection(Protocol):
    """A stream's connection once its response head is written: twisted.web's
    channel and request are let go (an idle stream then holds this, its
    Stream and its Session), as a WebSocket upgrade lets them go for
    Autobahn's protocol. The client has nothing more to say: what it sends
    is read and dropped (MAX_TRAILING bytes at most)."""

    #: Bytes a client may send once its stream is open, before it is cut off.
    MAX_TRAILING = 65536

    def __init__(self, stream: Stream, gone: Any) -> None:
        self.stream = stream
        self._gone = gone
        self._received = 0

    def dataReceived(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self.MAX_TRAILING and self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        gone, self._gone = self._gone, None
        if gone is not None:
            gone()


def take_over(request: Request, protocol: Protocol) -> Any:
    """Hand `request`'s connection to `protocol`, as Autobahn's WebSocket
    upgrade does (twisted.web's channel and request are done with): the
    transport, now `protocol`'s."""
    channel: Any = request.channel
    transport, channel.transport = channel.transport, None
    if isinstance(transport, ProtocolWrapper):
        transport.wrappedProtocol = protocol  # type: ignore[assignment]  # TLS
    elif isinstance(getattr(transport, "protocol", None), ProtocolWrapper):
        transport.protocol.wrappedProtocol = protocol
    else:
        transport.protocol = protocol
    protocol.makeConnection(transport)
    # The channel paused reading while it served the request: reads tell of a
    # client gone, so they go on.
    transport.unregisterProducer()
    transport.resumeProducing()
    let_go(channel)
    return transport


class StreamResource(Resource):
    """A stream's resource: `/sse` (pushd.transports.sse) or `/stream`
    (pushd.transports.ndjson), which say the format."""

    isLeaf = True
    #: The transport's name, in logs, metrics and the gate's connection counts.
    transport: str
    content_type: bytes
    #: Written as the stream opens.
    preamble = b""

    def __init__(
        self,
        hub: Hub,
        broker: Broker,
        gate: Gate,
        config: Config,
        clock: Any,
        metrics: Any,
        presence: Presence | None = None,
    ) -> None:
        Resource.__init__(self)
        self._presence = presence
        self._hub = hub
        self._broker = broker
        self._gate = gate
        self._config = config
        self._clock = clock
        self._metrics = metrics
        self._streams: set[Stream] = set()
        self._connections: OpenConnections[StreamConnection] = OpenConnections()
        self._keepalive = LoopingCall(self._beat)
        self._keepalive.clock = clock

    def _stream(self, chunked: bool, channels: list[str], cursor: dict[str, str]) -> Stream:
        """A new stream of this resource's format, resuming from `cursor`."""
        raise NotImplementedError

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
        if request.method == b"HEAD":
            # What a stream would be, without one: its head is not the start of a body.
            request.setHeader(b"content-type", self.content_type)
            request.setHeader(b"cache-control", b"no-cache")
            return b""
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
        address = request_host(request, self._config.trusted_proxies)
        d = self._gate.admit(
            address=address,
            token=token,
            headers=headers,
            transport=self.transport,
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
        if len(channels) > self._config.max_subscriptions:
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
            self._gate.release(address, self.transport)
            if refused:
                self._metrics.refused.labels("forbidden").inc()
                write_error(request, 403, "forbidden", f"not allowed to subscribe to {refused[0]}")
            return
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        chunked = request.clientproto == b"HTTP/1.1"
        head = _response_head(request, chunked)
        stream = self._stream(chunked, channels, cursor)
        stream.session = Session(self._hub, stream, self._presence)
        stream.session.present_as(grants.sub, grants.info)
        self._streams.add(stream)
        if not self._keepalive.running:
            self._keepalive.start(self._config.keepalive, now=False)
        ending: Any = None

        def gone() -> None:
            log.info("{transport} client {peer} gone", transport=self.transport, peer=address)
            stream.close()
            stream._transport = None
            self._streams.discard(stream)
            self._connections.discard(connection)
            self._gate.release(address, self.transport)
            if ending is not None and ending.active():
                ending.cancel()
            if not self._streams and self._keepalive.running:
                self._keepalive.stop()

        connection = StreamConnection(stream, gone)
        transport = take_over(request, connection)
        self._connections.add(connection)
        stream._transport = transport
        transport.registerProducer(stream, True)
        write_now(transport, head)
        stream._write(self.preamble)

        log.info("{transport} client {peer} admitted", transport=self.transport, peer=address)

        joining = [stream.session.subscribe(channel, cursor.get(channel)) for channel in channels]
        if grants.sub is not None:
            joining.append(stream.session.identify(grants.sub, self._config.personal(grants.sub)))
        # After every `subscribed` (the personal channel's too) and replay.
        DeferredList(joining).addCallback(lambda _: stream.live())
        if grants.expires is not None:
            delay = max(0.0, grants.expires - self._clock.seconds())
            ending = self._clock.callLater(delay, stream.end)

    def _slow_consumer(self) -> None:
        self._metrics.slow_consumers.labels(self.transport).inc()

    def end_all(self) -> None:
        """End every stream (the service is stopping)."""
        for stream in tuple(self._streams):
            stream.end()

    def all_gone(self) -> Deferred[None]:
        """Fires once every stream's connection is gone."""
        return self._connections.all_gone()

    def connections(self) -> tuple[StreamConnection, ...]:
        return tuple(self._connections)


def _response_head(request: Request, chunked: bool) -> bytes:
    """The stream's status line and headers, those set on `request` (its type,
    CORS) and how its body is framed."""
    lines = [b"HTTP/1.1 200 OK"]
    for name, values in request.responseHeaders.getAllRawHeaders():
        lines += (name + b": " + value for value in values)
    lines.append(b"transfer-encoding: chunked" if chunked else b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if value else None


def _last(args: dict[bytes, list[bytes]], name: bytes) -> str | None:
    values = args.get(name)
    return values[-1].decode("utf-8", "replace") if values else None
