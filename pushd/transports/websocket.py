"""The WebSocket endpoint `/ws`: subscribers receive messages here.

The wire protocol (shared/protocol.md is the contract; `->` client to server,
`<-` server to client). Every frame is one JSON object in a text frame.

  GET /ws?channel=a&channel=b[&since=<id>]     subscribes to a and b on connect

  -> {"type": "subscribe", "channel": "a", "since"?: "<id>"}
  <- {"type": "subscribed", "channel": "a", "recovered": false, "position": "<id>"|null}
       sent for every subscription (from the URL or a frame) before any
       message of that channel; "recovered" is true only when every retained
       message after `since` was delivered (no `since`: false); "position" is
       the channel's newest id once live and replayed (null: no history), the
       client's resume point until a message arrives: every message after it
       comes, none at or before it (pushd.session)
  <- {"type": "message", "channel": "a", "id": "<ms>-<seq>", "data": ...}
  -> {"type": "unsubscribe", "channel": "a"}
  <- {"type": "unsubscribed", "channel": "a"}
  -> {"type": "ping"}
  <- {"type": "pong"}
  -> {"type": "publish", "channel": "a", "data": ...}   needs a token's publish grant
  -> {"type": "presence", "channel": "a"}    a channel the client is subscribed to
  <- {"type": "presence", "channel": "a", "count": 2, "users": 1,
      "clients": [{"client": "<id>", "user": "<sub>"|null, "info": ...}, ...]}
  <- {"type": "join"|"leave", "channel": "a", "member": {"client": .., "user": .., "info": ..}}
       channels of --join-leave: a member came or went, on any node (pushd.presence)
  <- {"type": "error", "code": "<code>", "message": "...", "channel"?: "a"}
       codes: bad_json, bad_request, unknown_type, bad_channel, bad_since,
       already_subscribed, forbidden, presence_off, rate_limited, unavailable;
       the connection stays open

Protocol violations close with RFC 6455 codes (1007 invalid UTF-8, 1009 too
big, 1002 protocol error); pushd's own close codes: 1001 going away, 4008 slow
consumer, 4001 token expired, 4003 disconnected by the application.
"""

from __future__ import annotations

import struct
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Request
from txaio._common import _BatchedTimer

from pushd.auth import ANONYMOUS, AuthError, Gate, Grants, client_host, token_from
from pushd.broker import Broker, BrokerUnavailable, OutcomeUnknown
from pushd.config import Config
from pushd.hub import Hub
from pushd.limits import SendBound, TokenBucket
from pushd.message import (
    Burst,
    Delivery,
    data_json,
    dump_json,
    is_channel,
    load_json,
    parse_id,
)
from pushd.presence import Presence
from pushd.sending import unsent, write_now
from pushd.session import AlreadySubscribed, Session
from pushd.transports import autobahn_diet
from pushd.waiting import OpenConnections
from pushd.web.channel import let_go

log = Logger()

#: Seconds a client's publishes wait, together, for its own subscription of the
#: channel to be acknowledged (Session.acknowledged) before they go anyway.
ACK_WAIT = 1.0
#: Seconds a dropped connection may take to send what it still holds (its
#: close frame last) before it is aborted: a client that reads nothing holds
#: its bounded buffer no longer.
DROP_LINGER = 1.0

_PONG = dump_json({"type": "pong"})
FRAME_OVERHEAD = 1024


def text_frame(payload: bytes) -> bytes:
    """A whole text frame as a server sends it (RFC 6455 5.2: final, unmasked)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


def _frames(delivery: Delivery) -> bytes:
    """The frames of a message or a Burst, made once per fan-out."""
    if isinstance(delivery, Burst):
        return b"".join(m.frame or _frames(m) for m in delivery.messages)
    delivery.frame = frame = text_frame(delivery.payload)
    return frame


class FrameError(Exception):
    """A bad client frame: answered with an `error` frame, the connection stays."""

    def __init__(self, code: str, message: str, channel: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.channel = channel

    def frame(self) -> bytes:
        body: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message}
        if self.channel is not None:
            body["channel"] = self.channel
        return dump_json(body)


def _channel_of(msg: dict[str, Any]) -> str:
    channel = msg.get("channel")
    if not isinstance(channel, str) or not is_channel(channel):
        raise FrameError(
            "bad_channel",
            "channel names match [A-Za-z0-9_.:@=+-]{1,128}, optionally #ids",
            channel if isinstance(channel, str) and _echoable(channel) else None,
        )
    return channel


def _echoable(text: str) -> bool:
    """Short and valid Unicode: fit to be echoed back in an error frame."""
    return (
        len(text) <= 256 and text.isprintable() and not any("\ud800" <= c <= "\udfff" for c in text)
    )


def _since_of(msg: dict[str, Any], channel: str) -> str | None:
    since = msg.get("since")
    if since is None:
        return None
    try:
        if not isinstance(since, str):
            raise ValueError
        parse_id(since)
    except ValueError:
        raise FrameError("bad_since", "since must be a message id <ms>-<seq>", channel) from None
    return since


_OPEN = WebSocketServerProtocol.STATE_OPEN


class PushdServerProtocol(SendBound, WebSocketServerProtocol):  # type: ignore[misc]
    factory: PushdServerFactory
    session: Session
    grants: Grants = ANONYMOUS
    # The client address counted against --max-connections-per-ip, once admitted.
    _address: str | None = None
    _expiry: Any = None
    _bucket: TokenBucket | None = None
    # The client's last publish, which its next one waits for.
    _publishing: Deferred[None] | None = None
    # Set while the transport's buffer is full; _backlog counts what was queued since.
    _paused = False
    _backlog = 0
    replaying = False
    # The abort due once a closed connection's last bytes had their time (dropConnection).
    _linger: Any = None

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """Autobahn's own writes (the handshake's answer, its HTTP errors, close,
        ping and pong frames) go straight to the socket, as messages do
        (pushd.sending): one system call, and a close frame is out before a
        timer (the close handshake's, due first in a slow turn) can drop the
        connection with it still in Twisted's buffer. Autobahn's queued writes
        (`sync`, `chopsize`) stay Autobahn's."""
        if sync or chopsize or self.send_queue:
            super().sendData(data, sync, chopsize)
        else:
            write_now(self.transport, data)

    def sendPong(self, payload: bytes | None = None) -> None:
        """A pong counts against the slow-consumer bound as a message does: a
        client that pings and reads nothing is dropped (4008), not buffered."""
        if self.over(len(payload or b"") + 2, self.factory.max_send_buffer):
            self._slow_consumer()
            return
        super().sendPong(payload)  # type: ignore[no-untyped-call]

    def dropConnection(self, abort: bool = False) -> None:
        """Autobahn's drop, bounded in time. While bytes may still wait to be
        sent (a close frame behind a backlog, anything in TLS, whose close also
        waits for the client's close_notify), the connection is closed after
        sending them, even where Autobahn would abort and lose them, and
        aborted DROP_LINGER seconds later if the client has not let them go.
        With nothing unsent (plain TCP), Autobahn's close or abort is at once."""
        if self.state != self.STATE_CLOSED and unsent(self.transport):
            # Set first: a close that completes at once cancels it (connectionLost).
            self._linger = self.factory.reactor.callLater(DROP_LINGER, self._abort)
            super().dropConnection(abort=False)
        else:
            super().dropConnection(abort=abort)

    def _abort(self) -> None:
        self._linger = None
        if self.transport is not None:
            self.transport.abortConnection()

    def onConnect(self, request: ConnectionRequest) -> Any:
        factory = self.factory
        address = client_host(
            self.transport.getPeer(),  # type: ignore[union-attr, misc]
            request.headers.get("x-forwarded-for"),
            factory.trusted_proxies,
        )
        channels = request.params.get("channel", [])
        since = request.params.get("since", [None])[-1]
        self._initial = [{"channel": c, "since": since} for c in channels]
        self.session = Session(factory.hub, self, factory.presence)
        d = factory.gate.admit(
            address=address,
            token=token_from(
                request.params.get("token", [None])[-1], request.headers.get("authorization")
            ),
            headers=request.headers,
            transport="websocket",
            channels=channels,
        )
        return d.addCallbacks(self._admitted, self._refused, callbackArgs=(address,))

    def _admitted(self, grants: Grants, address: str) -> None:
        if self.state == self.STATE_CLOSED:
            # Gone while the application decided (the opening handshake's
            # timeout, the client left): its onClose had nothing to release,
            # and Autobahn must not open it (a refusal nobody reads ends it).
            self.factory.gate.release(address, "websocket")
            raise ConnectionDeny(408, "gone before it was admitted")
        log.info("websocket client {peer} admitted (user {sub})", peer=address, sub=grants.sub)
        self._address = address
        self.grants = grants
        self.session.present_as(grants.sub, grants.info)
        if grants.expires is not None:
            delay = max(0.0, grants.expires - self.factory.reactor.seconds())
            self._expiry = self.factory.reactor.callLater(delay, self._token_expired)

    def _refused(self, failure: Any) -> None:
        error = failure.value
        if isinstance(error, AuthError):
            log.info(
                "websocket client {peer} refused: {code}",
                peer=self.peer,
                code=error.code,
                status=error.status,
            )
            raise ConnectionDeny(error.status, error.message)
        log.failure("admitting a WebSocket client failed", failure)
        raise ConnectionDeny(500, "internal error")

    def _token_expired(self) -> None:
        self._expiry = None
        self.session.close()
        self.sendClose(4001, "token expired")

    def onOpen(self) -> None:
        # Twisted Web's channel is still the transport's producer after the
        # upgrade (library findings, 3): take its place to hear of a full buffer.
        transport: Any = self.transport
        transport.unregisterProducer()
        transport.registerProducer(self, True)
        self.factory.clients.add(self)
        initial = self._initial
        # Idle connections are most of a node's memory (pushd.transports.autobahn_diet).
        autobahn_diet.shrink(self, also=("_initial",))
        for msg in initial:
            self._handle(self.handle_subscribe, msg)
        # After the URL's channels: a `since` there for the personal channel counts.
        if self.grants.sub is not None:
            self.session.identify(self.grants.sub, self.factory.config.personal(self.grants.sub))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self._reply(FrameError("bad_request", "frames are JSON text, not binary").frame())
            return
        try:
            msg = load_json(payload)
        except ValueError:
            self._reply(FrameError("bad_json", "the frame is not valid JSON").frame())
            return
        kind = msg.get("type") if isinstance(msg, dict) else None
        if not isinstance(kind, str):
            self._reply(FrameError("bad_request", 'a frame is an object with a "type"').frame())
            return
        handler = self._handlers.get(kind)
        if handler is None:
            self._reply(FrameError("unknown_type", f"unknown frame type {kind[:64]!r}").frame())
            return
        self._handle(handler.__get__(self), msg)

    def _handle(self, handler: Any, msg: dict[str, Any]) -> None:
        try:
            handler(msg)
        except FrameError as e:
            self._reply(e.frame())

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        session = getattr(self, "session", None)
        if session is not None:
            session.close()
        if self._address is not None:
            log.info("websocket client {peer} gone ({code})", peer=self._address, code=code)
            self.factory.gate.release(self._address, "websocket")
            self._address = None
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self.factory.gone(self)

    def connectionLost(self, reason: Any = None) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        super().connectionLost(reason)
        # The session points back at the connection, as does Autobahn's is_closed.
        autobahn_diet.drop_cycles(self, also=("session",))

    # -- client frames

    def handle_subscribe(self, msg: dict[str, Any]) -> None:
        channel = _channel_of(msg)
        since = _since_of(msg, channel)
        if not self.grants.may_subscribe(channel):
            raise FrameError("forbidden", "not allowed to subscribe here", channel)
        if channel not in self.session and len(self.session) >= self.factory.max_subscriptions:
            raise FrameError("too_many_subscriptions", "too many subscriptions", channel)
        try:
            self.session.subscribe(channel, since)
        except AlreadySubscribed:
            raise FrameError("already_subscribed", "already subscribed", channel) from None

    def handle_unsubscribe(self, msg: dict[str, Any]) -> None:
        channel = _channel_of(msg)
        if not self.session.unsubscribe(channel, tell=True):
            self.unsubscribed(channel)

    def handle_ping(self, msg: dict[str, Any]) -> None:
        self._reply(_PONG)

    def handle_publish(self, msg: dict[str, Any]) -> None:
        channel = _channel_of(msg)
        if "data" not in msg:
            raise FrameError("bad_request", 'a publish frame has "data"', channel)
        if not self.grants.may_publish(channel):
            raise FrameError("forbidden", "not allowed to publish here", channel)
        factory = self.factory
        try:
            data = data_json(msg["data"])
        except ValueError:
            raise FrameError("bad_json", "the data is not valid Unicode JSON", channel) from None
        if len(data) > factory.max_message_size:
            raise FrameError("too_large", "data larger than --max-message-size", channel)
        if not self._take_token():
            raise FrameError("rate_limited", "publishing too fast", channel)

        # One after the other: a client's messages keep their order on the pool.
        previous, self._publishing = self._publishing, Deferred()
        Deferred.fromCoroutine(self._publish(previous, channel, data)).chainDeferred(
            self._publishing
        )

    async def _publish(self, previous: Deferred[None] | None, channel: str, data: bytes) -> None:
        if previous is not None:
            await previous
        # After this client's subscription to the channel, if it asked first;
        # not for longer than a read takes (Redis down: answered, not held).
        acknowledged = self.session.acknowledged(channel, ACK_WAIT, self.factory.reactor)
        if acknowledged is not None:
            await acknowledged
        factory = self.factory
        try:
            await factory.broker.publish(channel, data)
        except BrokerUnavailable:
            self._reply(FrameError("unavailable", "not published, retry", channel).frame())
        except OutcomeUnknown:
            self._reply(
                FrameError(
                    "outcome_unknown",
                    "the broker did not answer: may or may not be published",
                    channel,
                ).frame()
            )
        except Exception:
            log.failure("client publish failed")
        else:
            factory.metrics.published.labels("client").inc()

    def handle_presence(self, msg: dict[str, Any]) -> None:
        channel = _channel_of(msg)
        if channel not in self.session:
            raise FrameError("forbidden", "subscribe to the channel first", channel)
        presence = self.factory.presence
        if presence is None or not presence.tracks(channel):
            raise FrameError("presence_off", "this channel has no presence", channel)
        if not self._take_token():
            raise FrameError("rate_limited", "asking too fast", channel)
        presence.query(channel).addCallbacks(
            self._presence_answer, self._presence_failed, errbackArgs=(channel,)
        )

    def _presence_answer(self, body: bytes) -> None:
        self._reply(b'{"type":"presence",' + body[1:])

    def _presence_failed(self, failure: Any, channel: str) -> None:
        if not failure.check(BrokerUnavailable):
            log.failure("a presence query of {channel} failed", failure, channel=channel)
        self._reply(FrameError("unavailable", "presence is unavailable, retry", channel).frame())

    def _take_token(self) -> bool:
        """One of the connection's requests that cost the broker work (a
        publish, a presence query): False past --publish-rate."""
        factory = self.factory
        if self._bucket is None:
            self._bucket = TokenBucket(factory.publish_rate, factory.publish_burst, factory.reactor)
        return self._bucket.take()

    _handlers = {
        "subscribe": handle_subscribe,
        "unsubscribe": handle_unsubscribe,
        "ping": handle_ping,
        "publish": handle_publish,
        "presence": handle_presence,
    }

    # -- the session's outlet

    def subscribed(self, channel: str, recovered: bool, position: str | None) -> None:
        self._reply(
            dump_json(
                {
                    "type": "subscribed",
                    "channel": channel,
                    "recovered": recovered,
                    "position": position,
                }
            )
        )

    def unsubscribed(self, channel: str) -> None:
        self._reply(dump_json({"type": "unsubscribed", "channel": channel}))

    def disconnect(self) -> None:
        self.session.close()
        if self.state == self.STATE_OPEN:
            self.sendClose(4003, "disconnected by the application")

    def message(self, message: Delivery) -> None:
        if self.state != _OPEN:
            return
        frame = message.frame
        if frame is None:
            frame = message.frame = _frames(message)
        if self._paused and self.over(len(frame), self.factory.max_send_buffer):
            self._slow_consumer()
            return
        write_now(self.transport, frame)

    def _reply(self, payload: bytes) -> None:
        if self.state != self.STATE_OPEN:
            return
        if self.over(len(payload) + 10, self.factory.max_send_buffer):
            self._slow_consumer()
            return
        write_now(self.transport, text_frame(payload))

    # -- the transport's producer (SendBound)

    def stopProducing(self) -> None:
        pass

    def _slow_consumer(self) -> None:
        self.factory.metrics.slow_consumers.labels("websocket").inc()
        log.info("dropping a slow consumer: {peer}", peer=self.peer, transport="websocket")
        self.session.close()
        self.sendClose(4008, "slow consumer")


class PushdServerFactory(WebSocketServerFactory):
    protocol = PushdServerProtocol  # type: ignore[assignment]

    def __init__(
        self,
        hub: Hub,
        broker: Broker,
        config: Config,
        *,
        reactor: Any,
        gate: Gate,
        metrics: Any,
        presence: Presence | None = None,
    ) -> None:
        WebSocketServerFactory.__init__(self, reactor=reactor)
        # Autobahn runs its timers (auto-ping, open and close handshake
        # timeouts) on txaio's global reactor; on this factory's instead, a
        # test's Clock drives them too (tests/test_canaries.py).
        self._batched_timer = _BatchedTimer(
            200.0,
            1000,
            seconds_provider=reactor.seconds,
            delayed_call_creator=reactor.callLater,
        )
        # A class of this factory's own: connections read the factory's options
        # from it and share their plain defaults through it (autobahn_diet).
        self.protocol = autobahn_diet.protocol_class(PushdServerProtocol)
        self.hub = hub
        self.broker = broker
        self.presence = presence
        self.gate = gate
        self.config = config
        self.trusted_proxies = config.trusted_proxies
        self.max_subscriptions = config.max_subscriptions
        self.max_message_size = config.max_message_size
        self.max_send_buffer = config.max_send_buffer
        self.publish_rate = config.publish_rate
        self.publish_burst = config.publish_burst
        self.metrics = metrics
        # Open connections, to say goodbye (1001) when the service stops.
        self.clients: OpenConnections[PushdServerProtocol] = OpenConnections()
        # A publish frame carries up to --max-message-size of data plus its own fields:
        # such a frame is answered `too_large`; a frame larger still is closed with 1009.
        frame_limit = config.max_message_size + FRAME_OVERHEAD
        # Autobahn's defaults are unsafe for a public server (library findings, 3).
        WebSocketServerFactory.setProtocolOptions(
            self,
            maxMessagePayloadSize=frame_limit,
            maxFramePayloadSize=frame_limit,
            autoPingInterval=config.ping_interval,
            autoPingTimeout=config.ping_timeout,
            openHandshakeTimeout=config.handshake_timeout,
            closeHandshakeTimeout=1,
            failByDrop=False,
        )
        autobahn_diet.options_on_class(self)

    def gone(self, client: PushdServerProtocol) -> None:
        self.clients.discard(client)

    def close_all(self) -> Deferred[None]:
        """Close every connection with 1001 (going away); fires once all are gone."""
        d = self.clients.all_gone()
        for client in tuple(self.clients):
            client.session.close()
            # sendClose() refuses 1001 (applications may only send 1000 and 4xxx),
            # but "going away" is exactly what a stopping server says.
            client.sendCloseFrame(1001, b"server shutting down")
        return d


class WebSocketEndpoint(WebSocketResource):
    """`/ws`: a request that does not ask to upgrade gets the contract's JSON
    error (426) instead of Autobahn's HTML status page."""

    def __init__(self, factory: PushdServerFactory) -> None:
        WebSocketResource.__init__(self, factory)

    def render(self, request: Request) -> Any:
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if upgrade != b"websocket":
            request.setResponseCode(426)
            request.setHeader(b"upgrade", b"websocket")
            request.setHeader(b"connection", b"close")
            request.channel.persistent = False
            request.setHeader(b"content-type", b"application/json")
            return dump_json({"error": "upgrade_required", "message": "this is a WebSocket"})
        result = WebSocketResource.render(self, request)
        channel = request.channel
        if channel.transport is None:  # upgraded
            let_go(channel)
        return result
