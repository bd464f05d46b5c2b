"""The WebSocket endpoint `/ws`: subscribers receive messages here.

The wire protocol (shared/protocol.md is the contract; `->` client to server,
`<-` server to client). Every frame is one JSON object in a text frame.

  GET /ws?channel=a&channel=b[&since=<id>]     subscribes to a and b on connect

  -> {"type": "subscribe", "channel": "a", "since"?: "<id>"}
  <- {"type": "subscribed", "channel": "a", "recovered": false}
       sent for every subscription (from the URL or a frame) before any
       message of that channel; "recovered" is true only when every retained
       message after `since` was delivered (no `since`: false)
  <- {"type": "message", "channel": "a", "id": "<ms>-<seq>", "data": ...}
  -> {"type": "unsubscribe", "channel": "a"}
  <- {"type": "unsubscribed", "channel": "a"}
  -> {"type": "ping"}
  <- {"type": "pong"}
  -> {"type": "publish", "channel": "a", "data": ...}   needs a token's publish grant
  <- {"type": "error", "code": "<code>", "message": "...", "channel"?: "a"}
       codes: bad_json, bad_request, unknown_type, bad_channel, bad_since,
       already_subscribed, forbidden; the connection stays open

Protocol violations close with RFC 6455 codes (1007 invalid UTF-8, 1009 too
big, 1002 protocol error); pushd's own close codes: 1001 going away, 4008 slow
consumer, 4001 token expired, 4003 disconnected by the application.
"""

from __future__ import annotations

import json
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest

from pushd.broker import Broker
from pushd.hub import Hub
from pushd.message import Message, dump_json, is_channel, parse_id
from pushd.session import AlreadySubscribed, Session

_PONG = dump_json({"type": "pong"})


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
            channel if isinstance(channel, str) else None,
        )
    return channel


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


class PushdServerProtocol(WebSocketServerProtocol):
    factory: PushdServerFactory
    session: Session
    _initial: list[dict[str, Any]]

    def onConnect(self, request: ConnectionRequest) -> None:
        self.session = Session(self.factory.hub, self.factory.broker, self)
        since = request.params.get("since", [None])[-1]
        self._initial = [{"channel": c, "since": since} for c in request.params.get("channel", [])]

    def onOpen(self) -> None:
        for msg in self._initial:
            self._handle(self.handle_subscribe, msg)
        del self._initial

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self._reply(FrameError("bad_request", "frames are JSON text, not binary").frame())
            return
        try:
            msg = json.loads(payload)
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

    # -- client frames

    def handle_subscribe(self, msg: dict[str, Any]) -> None:
        channel = _channel_of(msg)
        since = _since_of(msg, channel)
        try:
            self.session.subscribe(channel, since)
        except AlreadySubscribed:
            raise FrameError("already_subscribed", "already subscribed", channel) from None

    def handle_unsubscribe(self, msg: dict[str, Any]) -> None:
        channel = _channel_of(msg)
        self.session.unsubscribe(channel)
        self._reply(dump_json({"type": "unsubscribed", "channel": channel}))

    def handle_ping(self, msg: dict[str, Any]) -> None:
        self._reply(_PONG)

    def handle_publish(self, msg: dict[str, Any]) -> None:
        channel = _channel_of(msg)
        raise FrameError("forbidden", "this connection may not publish here", channel)

    _handlers = {
        "subscribe": handle_subscribe,
        "unsubscribe": handle_unsubscribe,
        "ping": handle_ping,
        "publish": handle_publish,
    }

    # -- the session's outlet

    def subscribed(self, channel: str, recovered: bool) -> None:
        self._reply(dump_json({"type": "subscribed", "channel": channel, "recovered": recovered}))

    def message(self, message: Message) -> None:
        if self.state != self.STATE_OPEN:
            return
        frame = message.frame
        if frame is None:
            frame = message.frame = self.factory.prepareMessage(message.payload)
        self.sendPreparedMessage(frame)

    def replayed(self, channel: str, payload: bytes) -> None:
        self._reply(payload)

    def _reply(self, payload: bytes) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(payload)


class PushdServerFactory(WebSocketServerFactory):
    protocol = PushdServerProtocol  # type: ignore[assignment]

    def __init__(
        self,
        hub: Hub,
        broker: Broker,
        *,
        reactor: Any,
        max_message_size: int = 65536,
        ping_interval: float = 30.0,
        ping_timeout: float = 10.0,
    ) -> None:
        super().__init__(reactor=reactor)
        self.hub = hub
        self.broker = broker
        # Autobahn's defaults are unsafe for a public server (library findings, 3).
        self.setProtocolOptions(
            maxMessagePayloadSize=max_message_size,
            maxFramePayloadSize=max_message_size,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            openHandshakeTimeout=5,
            closeHandshakeTimeout=1,
            failByDrop=False,
        )
