"""Subscribing over pushd's WebSocket, resumed after every lost connection.

`Subscriber` keeps a resume point for every channel (the last id delivered, or,
on a channel quiet so far, the `position` pushd gave when it subscribed); when
the connection is lost (pushd restarted, 1001 going away, 4008 slow consumer, a
network error) it connects again after a jittered exponential backoff and
resubscribes with `since`, so no retained message is missed, on quiet channels
too, and drops any message it already delivered. It stops for good on close
code 4003 (disconnected by the application), on a handshake the server refuses
(401, 403, 404, 400: a new attempt would fare no better) and on 4001 (token
expired) unless `token` is a callable, which is then asked for a fresh token
before every connection.

Presence: `await subscriber.presence(channel)` asks pushd who is in a channel
it subscribes to (a `presence` frame; the answer is the frame, `{"type":
"presence", "channel", "count", "users", "clients"}`), and `on_join`/`on_leave`
are called with the `join`/`leave` frames of its `--join-leave` channels.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlencode

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger

from pushd.client.publisher import (
    _CONNECTION_ERRORS,
    USER_AGENT,
    PushdError,
    _Client,
)
from pushd.message import is_channel, parse_id

__all__ = ["BEGINNING", "Subscriber"]

log = Logger()

#: Handshake refusals a new attempt would not change: the Subscriber gives up.
_FATAL_HANDSHAKE = {400, 401, 403, 404, 405, 426}

#: pushd's refusals of a `presence` frame, with the status GET /channels/{c}/presence
#: answers the same refusal with (the PushdError's status).
_PRESENCE_REFUSALS = {
    "forbidden": 403,
    "presence_off": 404,
    "rate_limited": 429,
    "unavailable": 503,
}

Frame = dict[str, Any]


class _Protocol(WebSocketClientProtocol):
    factory: _Factory

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred[None] = Deferred()
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()

    def onOpen(self) -> None:
        self.opened.callback(None)
        for frame in self.factory.frames:
            WebSocketClientProtocol.sendMessage(self, json.dumps(frame, allow_nan=False).encode())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            frame = json.loads(payload)
        except ValueError:
            log.warn("pushd sent a frame that is not JSON: {payload!r:.100}", payload=payload)
            return
        if isinstance(frame, dict):
            self.factory.subscriber._frame(frame)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        # A close frame's code, even when the TCP connection then ended badly.
        code = self.remoteCloseCode or code
        reason = self.remoteCloseReason or reason or self.wasNotCleanReason
        if not self.opened.called:
            self.opened.errback(_HandshakeFailed(self.wasNotCleanReason or reason or ""))
        if not self.closed.called:
            self.closed.callback((code, reason))


class _Factory(WebSocketClientFactory):
    protocol = _Protocol  # type: ignore[assignment]

    def __init__(
        self, subscriber: Subscriber, url: str, frames: list[dict[str, Any]], reactor: Any
    ) -> None:
        WebSocketClientFactory.__init__(self, url, useragent=USER_AGENT, reactor=reactor)
        self.subscriber = subscriber
        self.frames = frames
        WebSocketClientFactory.setProtocolOptions(
            self, openHandshakeTimeout=10, closeHandshakeTimeout=2
        )


def hang_up(protocol: WebSocketClientProtocol) -> None:
    """Close a client connection: with a close frame (1000) once it is open,
    else by dropping it (an opening handshake in progress)."""
    if protocol.state == WebSocketClientProtocol.STATE_OPEN:
        protocol.sendClose(1000)
    elif protocol.state != WebSocketClientProtocol.STATE_CLOSED:
        protocol.dropConnection(abort=True)


class _HandshakeFailed(Exception):
    """The WebSocket connection did not open."""


_END = object()
#: The resume point of a channel that had no history: from its beginning.
BEGINNING = "0-0"


class Subscriber(_Client):
    """Subscribes to `channels` over pushd's WebSocket and keeps them subscribed.

    Iterate it (`async for envelope in subscriber`) for every message envelope
    (`{"type": "message", "channel", "id", "data"}`), and/or give `on_message`,
    called with each. `since` (a message id for every channel, or a mapping of
    channel to id) asks for the retained messages after it first. `token` is a
    subscriber token, or a callable returning one (maybe a Deferred/coroutine),
    asked before every connection. The connection starts on iteration, `start()`,
    `ready()` or `async with`; `close()` ends it and the iteration.

    `on_join` and `on_leave` are called with the `join` and `leave` frames
    (`{"type", "channel", "member": {"client", "user", "info"}}`) of channels
    pushd announces comings and goings on (`--join-leave`). pushd may announce a
    member twice (after an outage) or a leave without its join: keep members
    keyed by `member["client"]`. Comings and goings while disconnected are not
    replayed: ask `presence()` again after a reconnect (`connections` grows).
    """

    def __init__(
        self,
        url: str,
        channels: str | Iterable[str],
        *,
        token: str | Callable[[], str | Awaitable[str]] | None = None,
        reactor: Any = None,
        since: str | Mapping[str, str] | None = None,
        on_message: Callable[[dict[str, Any]], object] | None = None,
        on_join: Callable[[Frame], object] | None = None,
        on_leave: Callable[[Frame], object] | None = None,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        connect_timeout: float = 10.0,
    ) -> None:
        super().__init__(url, reactor, backoff, max_backoff)
        self.channels = [channels] if isinstance(channels, str) else list(dict.fromkeys(channels))
        if not self.channels:
            raise ValueError("no channels to subscribe to")
        for channel in self.channels:
            if not is_channel(channel):
                raise ValueError(f"{channel!r} is not a channel name")
        self.token = token
        self.on_message = on_message
        self.on_join = on_join
        self.on_leave = on_leave
        self.connect_timeout = connect_timeout
        #: Where a reconnect resumes, per channel: the id of the last message
        #: delivered, else the `position` pushd gave on subscribing ("0-0": the
        #: channel had no history, resume from its beginning).
        self.last_ids: dict[str, str] = {}
        if isinstance(since, str):
            self.last_ids = dict.fromkeys(self.channels, since)
        elif since is not None:
            self.last_ids = {c: s for c, s in since.items() if c in self.channels}
        for value in self.last_ids.values():
            parse_id(value)  # ValueError for a bad id
        #: How many times the connection opened; `recovered` of each channel's last `subscribed`.
        self.connections = 0
        self.recovered: dict[str, bool] = {}
        #: Set when the server ended it: close code 4003 and its reason.
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._queue: DeferredQueue[Any] = DeferredQueue()
        self._queueing = on_message is None
        self._subscribed: set[str] = set()
        self._ready: list[Deferred[None]] = []
        self._protocol: _Protocol | None = None
        self._running: Deferred[None] | None = None
        self._waiting: Deferred[Any] | None = None
        self._closing = False
        self._failure: Exception | None = None
        self._done: Deferred[None] = Deferred()
        #: presence() calls waiting for their answer, (channel, answer) in the order
        #: asked (pushd answers a channel's in that order).
        self._asked: list[tuple[str, Deferred[Frame]]] = []

    # -- the public side

    def start(self) -> None:
        """Connect (once; later calls do nothing)."""
        if self._running is None and not self._closing:
            self._running = Deferred.fromCoroutine(self._run())
            self._running.addErrback(self._crashed)

    def ready(self) -> Deferred[None]:
        """Fires once every channel is subscribed on the current connection (or the
        subscriber has stopped: then fails with the reason, if there is one)."""
        self.start()
        d: Deferred[None] = Deferred()
        if self._done.called:
            self._settle(d)
        elif self._protocol is not None and self._subscribed >= set(self.channels):
            d.callback(None)
        else:
            self._ready.append(d)
        return d

    @property
    def done(self) -> Deferred[None]:
        """Fires when the subscriber has stopped for good (fails with the reason, if any)."""
        d: Deferred[None] = Deferred()

        def settle(result: None) -> None:
            self._settle(d)
            return result

        self._done.addCallback(settle)
        return d

    def close(self) -> Deferred[None]:
        """Stop: close the connection, end the iteration; fires (None) once closed."""
        self._closing = True
        if self._waiting is not None and not self._waiting.called:
            self._waiting.cancel()
        if self._protocol is not None:
            hang_up(self._protocol)
        if self._running is None:
            self._finish(None)
        closed: Deferred[None] = Deferred()
        self._done.addCallback(lambda _: closed.callback(None))
        return closed

    def presence(self, channel: str) -> Deferred[Frame]:
        """Who is in `channel` (one of this subscriber's, a `--presence` channel),
        as pushd answers the `presence` frame: `{"type": "presence", "channel",
        "count", "users", "clients": [{"client", "user", "info"}, ...]}` (`count`
        members, `users` distinct users; `clients` capped by pushd's
        `--max-presence-list`). On a started subscriber, one of its channels is
        asked once subscribed on the connection (as `ready()` waits), since pushd
        refuses the frame before. Raises `PushdError` with code `forbidden` (not
        subscribed), `presence_off`, `rate_limited`, `unavailable` (pushd could
        not read it), `unknown_type` (a pushd without presence), `not_connected`
        (not started, stopped, or another channel with no connection open) or
        `connection_lost` (lost before the answer); the last two with status 0.
        A Deferred (like `ready()`), so the frame is sent at once."""
        return Deferred.fromCoroutine(self._presence(channel))

    async def _presence(self, channel: str) -> Frame:
        running = self._running is not None and not self._closing
        if running and channel in self.channels and channel not in self._subscribed:
            await self.ready()
        protocol = self._protocol
        if protocol is None or protocol.state != WebSocketClientProtocol.STATE_OPEN:
            raise PushdError(0, "not_connected", "not connected to pushd")
        answer: Deferred[Frame] = Deferred()
        self._asked.append((channel, answer))
        frame = {"type": "presence", "channel": channel}
        WebSocketClientProtocol.sendMessage(protocol, json.dumps(frame).encode())
        return await answer

    def __aiter__(self) -> Subscriber:
        self._queueing = True
        self.start()
        return self

    async def __anext__(self) -> dict[str, Any]:
        self.start()
        item = await self._queue.get()
        if item is _END:
            self._queue.put(_END)  # for the next call, too
            if self._failure is not None:
                raise self._failure
            raise StopAsyncIteration
        result: dict[str, Any] = item
        return result

    async def __aenter__(self) -> Subscriber:
        await self.ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the connection loop

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            protocol: _Protocol | None = None
            try:
                protocol = await self._connect()
            except PushdError as exc:
                self._finish(exc)
                return
            except (_HandshakeFailed, defer.CancelledError, *_CONNECTION_ERRORS, OSError) as exc:
                if self._closing:
                    break
                log.info("pushd subscriber: cannot connect: {error}", error=exc)
            if protocol is not None:
                self.connections += 1
                code, reason = await protocol.closed
                self._protocol = None
                if self._subscribed:
                    attempt = 0  # it worked: start the backoff over
                self._subscribed.clear()
                # Last: the callers it fails run now, and see the subscriber as it now is.
                self._unanswered("connection_lost", "the connection was lost before pushd answered")
                if self._closing:
                    break
                if code == 4003:
                    self.close_code, self.close_reason = code, reason
                    log.info("pushd subscriber: disconnected by the application: {r}", r=reason)
                    self._finish(None)
                    return
                if code == 4001 and not callable(self.token):
                    self._finish(PushdError(401, "token_expired", reason or "token expired"))
                    return
                log.info(
                    "pushd subscriber: connection closed ({code} {reason})",
                    code=code,
                    reason=reason,
                )
            self._waiting = self._pause(attempt)
            try:
                await self._waiting
            except defer.CancelledError:
                break
            finally:
                self._waiting = None
            attempt += 1
        self._finish(None)

    async def _connect(self) -> _Protocol:
        """One connection, open (its subscriptions asked for); PushdError when refused."""
        token: Any = self.token
        if callable(token):
            token = token()
            if not isinstance(token, str):
                token = await token
        url_channels = [c for c in self.channels if c not in self.last_ids]
        frames = [
            {"type": "subscribe", "channel": c, "since": self.last_ids[c]}
            for c in self.channels
            if c in self.last_ids
        ]
        params: list[tuple[str, str]] = [("channel", c) for c in url_channels]
        if not url_channels and len({f["since"] for f in frames}) == 1:
            # One `since` for all (the first connection's): all on the URL.
            params = [("channel", f["channel"]) for f in frames] + [("since", frames[0]["since"])]
            frames = []
        if token:
            params.append(("token", str(token)))
        factory = _Factory(self, self.target.ws_url(urlencode(params)), frames, self.reactor)
        endpoint: Any = HostnameEndpoint(
            self.reactor, self.target.host, self.target.port, timeout=self.connect_timeout
        )
        if self.target.secure:
            endpoint = wrapClientTLS(optionsForClientTLS(self.target.host), endpoint)
        self._waiting = endpoint.connect(factory)
        try:
            protocol: _Protocol = await self._waiting
        finally:
            self._waiting = None
        self._protocol = protocol
        try:
            await protocol.opened
        except _HandshakeFailed as exc:
            self._protocol = None
            refused = re.search(r"upgrade failed \[(\d+)\]: ?(.*)", str(exc))
            if refused and int(refused.group(1)) in _FATAL_HANDSHAKE:
                raise PushdError(
                    int(refused.group(1)), "handshake_refused", refused.group(2) or str(exc)
                ) from None
            raise
        if self._closing:  # close() came while connecting
            protocol.sendClose(1000)
        return protocol

    # -- frames

    def _frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        channel = frame.get("channel")
        if kind == "message" and isinstance(channel, str):
            self._message(frame, channel)
        elif kind == "subscribed" and isinstance(channel, str):
            self._subscribed.add(channel)
            self.recovered[channel] = bool(frame.get("recovered"))
            if channel in self.channels and "position" in frame:
                self._adopt_position(channel, frame["position"])
            if self._subscribed >= set(self.channels):
                waiting, self._ready = self._ready, []
                for d in waiting:
                    d.callback(None)
        elif kind in ("join", "leave") and isinstance(frame.get("member"), dict):
            callback = self.on_join if kind == "join" else self.on_leave
            if callback is not None:
                try:
                    callback(frame)
                except Exception:
                    log.failure("pushd subscriber: on_{kind} failed", kind=kind)
        elif (
            kind == "presence"
            and isinstance(channel, str)
            and (asked := self._oldest_asked(channel)) is not None
        ):
            asked.callback(frame)
        elif (
            kind == "error"
            and frame.get("code") in _PRESENCE_REFUSALS
            and isinstance(channel, str)
            and (asked := self._oldest_asked(channel)) is not None
        ):
            # presence() waited for the subscription, so no refusal of it is still to come:
            # this one is the oldest presence frame's.
            code = str(frame["code"])
            asked.errback(PushdError(_PRESENCE_REFUSALS[code], code, str(frame.get("message", ""))))
        elif (
            kind == "error"
            and frame.get("code") == "unknown_type"
            and (asked := self._oldest_asked(None)) is not None
        ):
            # A pushd without presence: `presence` is the one frame asked after the connect.
            asked.errback(PushdError(400, "unknown_type", str(frame.get("message", ""))))
        elif kind == "error":
            log.warn(
                "pushd subscriber: error {code} ({channel}): {message}",
                code=frame.get("code"),
                channel=channel,
                message=frame.get("message"),
            )
            if channel in self.channels and frame.get("code") in (
                "forbidden",
                "bad_channel",
                "too_many_subscriptions",
            ):
                # This channel will never be subscribed: stop waiting for it.
                self._subscribed.add(channel)

    def _adopt_position(self, channel: str, position: Any) -> None:
        """pushd's `position` (the channel's newest id once live; None: no
        history, so from its beginning, "0-0") becomes the resume point of a
        channel that has none yet, so a quiet channel is resumed too; and of
        one whose `since` is ahead of the channel (clock skew), whose live
        messages would look old. Otherwise the resume point stays: a replay
        after it follows, and a connection lost before it arrives must ask for
        it again."""
        at = position if isinstance(position, str) else BEGINNING
        try:
            key = parse_id(at)
        except ValueError:
            return
        last = self.last_ids.get(channel)
        if last is None or parse_id(last) > key:
            self.last_ids[channel] = at

    def _message(self, frame: dict[str, Any], channel: str) -> None:
        msg_id = frame.get("id")
        if isinstance(msg_id, str):
            last = self.last_ids.get(channel)
            try:
                if last is not None and parse_id(msg_id) <= parse_id(last):
                    return  # delivered already (before a reconnect)
            except ValueError:
                pass
            self.last_ids[channel] = msg_id
        if self._queueing:
            self._queue.put(frame)
        if self.on_message is not None:
            try:
                self.on_message(frame)
            except Exception:
                log.failure("pushd subscriber: on_message failed")

    # -- the end

    def _oldest_asked(self, channel: str | None) -> Deferred[Frame] | None:
        """The oldest presence() waiting on `channel` (None: on any), taken off the list."""
        for i, (asked, answer) in enumerate(self._asked):
            if channel is None or asked == channel:
                del self._asked[i]
                return answer
        return None

    def _unanswered(self, code: str, message: str) -> None:
        asked, self._asked = self._asked, []
        for _, d in asked:
            d.errback(PushdError(0, code, message))

    def _settle(self, d: Deferred[None]) -> None:
        if self._failure is not None:
            d.errback(self._failure)
        else:
            d.callback(None)

    def _finish(self, failure: Exception | None) -> None:
        if self._done.called:
            return
        self._closing = True
        self._failure = failure
        self._unanswered("connection_lost", "the subscriber stopped before pushd answered")
        self._queue.put(_END)
        waiting, self._ready = self._ready, []
        for d in waiting:
            self._settle(d)
        self._done.callback(None)

    def _crashed(self, failure: Any) -> None:
        log.failure("pushd subscriber failed", failure)
        self._finish(failure.value)
