"""An in-process pushd for your application's tests (trial or pytest-twisted).

Start pushd on the memory broker in the test's own reactor, publish to it, and
collect what a WebSocket subscriber got; then stop it::

    from pushd.testing import PushdServer

    async def test_news():
        async with PushdServer(api_key="k") as pushd:
            subscriber = await pushd.subscribe("news")
            message_id = await pushd.publish("news", {"headline": "up"})
            [envelope] = await subscriber.wait_for(1)
            assert envelope["id"] == message_id

Every wait takes a `timeout` in seconds and fails with
`twisted.internet.defer.TimeoutError`; nothing in here sleeps to synchronise.
The README's "Testing your application with pushd.testing" has complete
pytest-twisted and trial examples.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import fields
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IListeningPort

from pushd.config import Config
from pushd.service import PushdService, make_service

__all__ = [
    "DEFAULT_TIMEOUT",
    "PublishError",
    "PushdServer",
    "SubscribeError",
    "Subscriber",
    "make_config",
    "start_service",
]

#: Seconds any wait of this module takes unless told otherwise.
DEFAULT_TIMEOUT = 10.0

#: A free port on the loopback interface, chosen by the OS when listening.
LOOPBACK = "tcp:0:interface=127.0.0.1"

#: Config fields that hold several values: a single string given for one is one value.
_TUPLES = frozenset(f.name for f in fields(Config) if f.name != "given" and "tuple" in str(f.type))


class PublishError(Exception):
    """pushd refused a publish: `code` is the HTTP status, `body` the parsed JSON
    answer (`{"error": "<code>", "message": ...}`) or the raw text."""

    def __init__(self, code: int, body: Any) -> None:
        super().__init__(f"publish refused: {code} {body!r}")
        self.code = code
        self.body = body


class SubscribeError(Exception):
    """A subscription did not happen: the handshake was refused (`code`, `reason`
    of the close) or pushd answered an `error` frame (`frame`) for a channel."""

    def __init__(
        self, message: str, *, code: int | None = None, reason: str | None = None, frame: Any = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.frame = frame


def _reactor(reactor: Any) -> Any:
    if reactor is None:
        from twisted.internet import reactor as default

        return default
    return reactor


def make_config(listen: str | Sequence[str] | None = None, **options: Any) -> Config:
    """A Config for a pushd under test: listening on `listen` (a Twisted endpoint
    description, or several; default a free loopback port), server pings off,
    everything else pushd's default unless given in `options`.

    `options` are Config's field names, i.e. the long option names with `_` for
    `-` (`token_secret="..."`, `history_size=10`), with Python values (numbers as
    numbers). A repeatable option takes a sequence or one string (`api_key="k"`).
    An unknown name raises TypeError.
    """
    known = {f.name for f in fields(Config)} - {"given"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown pushd option(s): {', '.join(unknown)}")
    if listen is None:
        listen = (LOOPBACK,)
    elif isinstance(listen, str):
        listen = (listen,)
    values: dict[str, Any] = {"ping_interval": 0, **options, "listen": tuple(listen)}
    for key in _TUPLES & set(values):
        if isinstance(values[key], str):
            values[key] = (values[key],)
        else:
            values[key] = tuple(values[key])
    return Config(**values)


async def start_service(
    config: Config, reactor: Any = None, timeout: float = DEFAULT_TIMEOUT
) -> tuple[PushdService, list[IListeningPort]]:
    """Start pushd's service for `config` in `reactor` (default: the global one);
    return it and its listening ports (in `config.listen`'s order) once it listens
    and its broker is ready. A port that cannot be listened on raises (as
    `CannotListenError`); TimeoutError after `timeout` seconds. Stop the service
    with `await service.stopService()`."""
    reactor = _reactor(reactor)
    service = make_service(config, reactor)
    service.startService()
    try:
        ports = await service.when_listening().addTimeout(timeout, reactor)
        await service.broker.when_ready().addTimeout(timeout, reactor)
    except BaseException:
        await service.stopService()
        raise
    return service, ports


class PushdServer:
    """pushd running in this process on the memory broker, for a test.

    `PushdServer(endpoint=None, *, reactor=None, **options)`: `endpoint` is a
    Twisted server endpoint description (default: a free loopback port);
    `options` as `make_config` takes them (`api_key=`, `token_secret=`, ...).
    Start with `await server.start()` (returns the server) and stop with
    `await server.stop()`, or use `async with PushdServer(...) as server:`.
    """

    def __init__(self, endpoint: str | None = None, *, reactor: Any = None, **options: Any) -> None:
        if options.get("redis") or options.get("redis_sentinel"):
            raise TypeError("pushd.testing runs on the memory broker: no redis options")
        self.config = make_config(endpoint, **options)
        self.reactor = _reactor(reactor)
        self.service: PushdService | None = None
        self.ports: list[IListeningPort] = []
        self._subscribers: list[Subscriber] = []

    async def start(self, timeout: float = DEFAULT_TIMEOUT) -> PushdServer:
        """Listen and get ready; raises what listening raised, or TimeoutError."""
        if self.service is not None:
            raise RuntimeError("already started")
        self.service, self.ports = await start_service(self.config, self.reactor, timeout)
        return self

    async def stop(self) -> None:
        """Close the subscribers made by `subscribe`, then stop pushd gracefully
        (as on SIGTERM). Every socket is closed when it returns; safe to call twice."""
        subscribers, self._subscribers = self._subscribers, []
        service, self.service = self.service, None
        try:
            closing = [Deferred.fromCoroutine(s.close()) for s in subscribers]
            await gatherResults(closing, consumeErrors=True)
        finally:
            # pushd stops even when a subscriber did not close in time (it says 1001 to it).
            if service is not None and service.running:
                await service.stopService()

    async def __aenter__(self) -> PushdServer:
        return await self.start()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def host(self) -> str:
        """The address of the first listener (`127.0.0.1` by default)."""
        return str(self._address().host)

    @property
    def port(self) -> int:
        """The TCP port of the first listener."""
        return int(self._address().port)

    def _address(self) -> Any:
        if not self.ports:
            raise RuntimeError("pushd is not listening: await start() first")
        port: Any = self.ports[0]
        address = port.getHost()
        if not hasattr(address, "port"):
            raise RuntimeError(f"the first listener is not TCP: {address}")
        return address

    @property
    def url(self) -> str:
        """`http://host:port` of the first listener, for your HTTP clients."""
        return f"http://{self._netloc()}"

    @property
    def ws_url(self) -> str:
        """`ws://host:port/ws` of the first listener, for your WebSocket clients."""
        return f"ws://{self._netloc()}/ws"

    def _netloc(self) -> str:
        host = self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        text: bool = False,
        headers: dict[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> str:
        """POST `data` to `/channels/{channel}` (the producer API); return the id of
        the message (`"<ms>-<seq>"`).

        `data` is sent as JSON and delivered as that JSON value; with `text=True`
        it must be a `str` and is sent and delivered as text. The first `api_key`
        the server was given is sent as the bearer token (give `headers` to send
        others). Raises PublishError for any answer but 200, TimeoutError after
        `timeout` seconds.
        """
        import treq

        if text:
            body, content_type = str(data).encode(), "text/plain; charset=utf-8"
        else:
            body, content_type = json.dumps(data).encode(), "application/json"
        sent = {"content-type": content_type}
        if self.config.api_key:
            sent["authorization"] = f"Bearer {self.config.api_key[0]}"
        sent.update(headers or {})
        wire: dict[bytes | str, list[bytes | str]] = {k: [v] for k, v in sent.items()}
        response = await treq.post(
            f"{self.url}/channels/{quote(channel, safe='')}",
            body,
            headers=wire,
            persistent=False,
            timeout=timeout,
            reactor=self.reactor,
        )
        answer = await treq.text_content(response)
        try:
            parsed = json.loads(answer)
        except ValueError:
            parsed = answer
        if response.code != 200:
            raise PublishError(response.code, parsed)
        return str(parsed["id"])

    async def subscribe(
        self,
        *channels: str,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Subscriber:
        """Connect a WebSocket subscriber to `channels` (with `token`, a subscriber
        JWT, when given) and return it once pushd has answered `subscribed` for every
        channel: from then on each message published to them reaches it.

        Raises SubscribeError when the handshake is refused (401, 403, ...) or a
        channel is answered with an `error` frame; TimeoutError after `timeout`
        seconds. `stop()` closes it.
        """
        from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint

        query = [("channel", c) for c in channels]
        if token is not None:
            query.append(("token", token))
        path = "/ws" + (f"?{urlencode(query)}" if query else "")
        factory: Any = WebSocketClientFactory(
            f"ws://{self._netloc()}{path}", headers=headers, reactor=self.reactor
        )
        factory.protocol = Subscriber
        kind = TCP6ClientEndpoint if ":" in self.host else TCP4ClientEndpoint
        endpoint = kind(self.reactor, self.host, self.port, timeout=timeout)
        subscriber: Subscriber = await endpoint.connect(factory).addTimeout(timeout, self.reactor)
        self._subscribers.append(subscriber)
        try:
            await subscriber._ready(set(channels), timeout)
        except BaseException:
            await subscriber.close(timeout)
            raise
        return subscriber


class Subscriber(WebSocketClientProtocol):
    """A WebSocket subscriber (Autobahn) that keeps what it receives.

    `messages`: the envelopes received, in order (`{"type": "message", "channel",
    "id", "data"}` dicts); `frames`: every frame received, parsed. Made by
    `PushdServer.subscribe`; its waits fail with TimeoutError after `timeout`
    seconds, or ConnectionError when the connection closes first.
    """

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[dict[str, Any]] = []
        self.frames: list[dict[str, Any]] = []
        #: (wasClean, code, reason) once closed.
        self.close_status: tuple[bool, int | None, str | None] | None = None
        self._read = 0
        self._waiters: list[tuple[Callable[[], bool], Deferred[None]]] = []
        self._opened: Deferred[None] = Deferred()
        self._closed: Deferred[None] = Deferred()

    # Autobahn's callbacks.

    def onOpen(self) -> None:
        self._opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        frame = json.loads(payload)
        self.frames.append(frame)
        if frame.get("type") == "message":
            self.messages.append(frame)
        self._wake()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close_status = (wasClean, code, reason)
        if not self._opened.called:
            self._opened.errback(
                SubscribeError(f"handshake refused: {code} {reason}", code=code, reason=reason)
            )
        self._wake()
        if not self._closed.called:
            self._closed.callback(None)

    # Waiting.

    def _wake(self) -> None:
        for item in list(self._waiters):
            check, d = item
            try:
                done = check()
            except BaseException as e:  # the check's own verdict, e.g. an error frame
                self._waiters.remove(item)
                d.errback(e)
                continue
            if done:
                self._waiters.remove(item)
                d.callback(None)
            elif self.close_status is not None:
                self._waiters.remove(item)
                d.errback(ConnectionError(f"connection closed: {self.close_status}"))

    async def _until(self, check: Callable[[], bool], timeout: float) -> None:
        if check():
            return
        if self.close_status is not None:
            raise ConnectionError(f"connection closed: {self.close_status}")

        def cancel(d: Deferred[None]) -> None:
            self._waiters[:] = [w for w in self._waiters if w[1] is not d]

        d: Deferred[None] = Deferred(cancel)
        self._waiters.append((check, d))
        await d.addTimeout(timeout, self.factory.reactor)

    async def _ready(self, channels: set[str], timeout: float) -> None:
        await self._opened.addTimeout(timeout, self.factory.reactor)

        def subscribed() -> bool:
            done = set()
            for frame in self.frames:
                if frame.get("type") == "error" and frame.get("channel") in channels:
                    raise SubscribeError(f"subscription refused: {frame}", frame=frame)
                if frame.get("type") == "subscribed":
                    done.add(frame.get("channel"))
            return channels <= done

        await self._until(subscribed, timeout)

    async def next(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """The next envelope not yet returned by `next()` (the first, at first)."""
        await self._until(lambda: len(self.messages) > self._read, timeout)
        self._read += 1
        return self.messages[self._read - 1]

    async def wait_for(self, count: int, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
        """The first `count` envelopes received (a list), once they all arrived."""
        await self._until(lambda: len(self.messages) >= count, timeout)
        return self.messages[:count]

    def send(self, frame: dict[str, Any]) -> None:
        """Send one client frame, e.g. `{"type": "subscribe", "channel": "a"}`."""
        WebSocketClientProtocol.sendMessage(self, json.dumps(frame).encode())

    async def close(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Close (1000) and wait until the connection is gone; safe to call twice."""
        if self._closed.called:
            return
        if self.close_status is None:
            self.sendClose(1000)
        await self._closed.addTimeout(timeout, self.factory.reactor)
