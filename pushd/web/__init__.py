"""pushd's HTTP side: one Site serving the producer API and the WebSocket endpoint."""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from pushd import __version__
from pushd.auth import Gate
from pushd.broker import Broker
from pushd.config import Config
from pushd.hub import Hub
from pushd.message import dump_json
from pushd.metrics import Metrics
from pushd.sending import write_now
from pushd.web.batch import PublishResource, PushResource
from pushd.web.control import UsersResource
from pushd.web.fastpath import FastPublish
from pushd.web.ops import HealthResource, MetricsResource
from pushd.web.producer import ChannelsResource, Producing
from pushd.web.resource import NotFound, ProducerAuth
from pushd.web.streams import StreamResource


class PushdRequest(Request):
    """A request whose body is capped: past the limit the rest is discarded
    and the resource answers 413, so a large body never sits in memory."""

    max_body = 65536
    body_too_large = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self.body_too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        assert self.content is not None
        if self.content.tell() + len(data) > self.max_body:
            self.body_too_large = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)


class WebSocketEndpoint(WebSocketResource):
    """`/ws`: a request that does not ask to upgrade gets the contract's JSON
    error (426) instead of Autobahn's HTML status page."""

    def render(self, request: Request) -> Any:
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if upgrade != b"websocket":
            request.setResponseCode(426)
            request.setHeader(b"upgrade", b"websocket")
            request.setHeader(b"connection", b"close")
            request.channel.persistent = False
            request.setHeader(b"content-type", b"application/json")
            return dump_json({"error": "upgrade_required", "message": "this is a WebSocket"})
        result = super().render(request)
        channel = request.channel
        if channel.transport is None:
            # Upgraded: Twisted Web's channel and request are done with, but hold
            # each other; let go of one side, so both go now, not at a full GC.
            channel.requests.clear()
        return result


class QuietSite(Site):
    """A Site without an access log: at push rates a line per request costs more than the push."""

    def log(self, request: Any) -> None:
        pass


class Root(Resource):
    """`/`: the demo page when it is on, else what this server is, as JSON."""

    def __init__(self, demo: bool) -> None:
        super().__init__()
        self._demo = demo

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"" and not request.postpath:
            return self
        return NotFound()

    def render_GET(self, request: Request) -> bytes:
        if self._demo:
            return static_file(request, "index.html", b"text/html; charset=utf-8")
        request.setHeader(b"content-type", b"application/json")
        return dump_json({"service": "pushd", "version": __version__})


class StaticFile(Resource):
    """A file shipped in pushd/static, read once."""

    isLeaf = True

    def __init__(self, name: str, content_type: bytes) -> None:
        super().__init__()
        self._name = name
        self._content_type = content_type

    def render_GET(self, request: Request) -> bytes:
        return static_file(request, self._name, self._content_type)


def static_file(request: Request, name: str, content_type: bytes) -> bytes:
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-cache")
    return _static(name)


@lru_cache(maxsize=8)
def _static(name: str) -> bytes:
    return (files("pushd") / "static" / name).read_bytes()


class PushdChannel(HTTPChannel):
    """Twisted Web's connection with pushd's bounds on what a stranger sends
    before a request is complete: `handshake_timeout` seconds for the request
    line and headers (slowloris), `max_header_size` bytes for them (414 for
    a request line over it, 431 for headers)."""

    handshake_timeout = 10.0
    max_header_size = 16384
    _deadline: Any = None
    _header_bytes = 0
    _refused = False
    #: The producers' hot path (pushd.web.fastpath), when the site has one.
    fast: FastPublish | None = None
    # What arrives while a request of the hot path waits for the broker.
    _fast_waiting: list[bytes] | None = None
    _peer: Any = None

    def connectionMade(self) -> None:
        self.MAX_LENGTH = self.totalHeadersSize = self.max_header_size
        super().connectionMade()
        self._start_deadline()

    def _start_deadline(self) -> None:
        self._header_bytes = 0
        self._deadline = self.callLater(self.handshake_timeout, self._too_slow)

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def lineReceived(self, line: bytes) -> None:
        self._header_bytes += len(line) + 2
        if self._header_bytes > self.max_header_size:
            self._refuse(b"431 Request Header Fields Too Large", "headers_too_large")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._header_bytes == 0:
            self._refuse(b"414 URI Too Long", "url_too_long")
        else:
            self._refuse(b"431 Request Header Fields Too Large", "headers_too_large")

    def allHeadersReceived(self) -> None:
        self._stop_deadline()
        # Pipelined requests are parsed before requestDone: count each one's own.
        self._header_bytes = 0
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        if self.transport is not None and not self._handlingRequest:
            self._start_deadline()

    def connectionLost(self, reason: Any = None) -> None:
        self._stop_deadline()
        super().connectionLost(reason)

    def _too_slow(self) -> None:
        self._deadline = None
        if self._fast_waiting is not None:
            self._start_deadline()  # a whole request waits for the broker, not the client
            return
        self._refuse(b"408 Request Timeout", "timeout")

    def _refuse(self, status: bytes, code: str) -> None:
        self._stop_deadline()
        if self.transport is None:
            return
        body = dump_json({"error": code, "message": status[4:].decode()})
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        self._refused = True
        self.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._fast_waiting is not None:
            self._fast_waiting.append(data)
            return
        if self.fast is not None and self._between_requests():
            if self._peer is None:
                transport: Any = self.transport
                self._peer = transport.getPeer()
            request = self.fast.parse(data, self._peer)
            if request is not None:
                self.resetTimeout()
                self._fast_waiting = []
                self.fast.publish(request, self._fast_answer)
                return
        super().dataReceived(data)

    def _between_requests(self) -> bool:
        return bool(
            self._HTTPChannel__first_line  # type: ignore[attr-defined]
            and not self.requests
            and self.line_mode
            and not self._buffer
            and self.persistent
        )

    def _fast_answer(self, response: bytes) -> None:
        """The hot path's answer; then what came meanwhile (pipelined) is read."""
        waiting, self._fast_waiting = self._fast_waiting, None
        if self.transport is None:
            return
        write_now(self.transport, response)
        # The next request's headers have their deadline from now.
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(self.handshake_timeout)
        else:
            self._start_deadline()
        if waiting:
            self.dataReceived(b"".join(waiting))


def make_site(
    *,
    hub: Hub,
    broker: Broker,
    gate: Gate,
    ws_factory: Any,
    config: Config,
    metrics: Metrics,
    reactor: Any,
) -> Site:
    root = Root(config.demo if config.demo is not None else not config.uses_redis)
    producing = Producing(
        broker, ProducerAuth(config.api_key, config.trusted_proxies), metrics, config
    )
    children: dict[bytes, Any] = {
        b"ws": WebSocketEndpoint(ws_factory),
        b"sse": StreamResource(hub, broker, gate, config, reactor, metrics, sse=True),
        b"stream": StreamResource(hub, broker, gate, config, reactor, metrics, sse=False),
        b"channels": ChannelsResource(producing),
        b"publish": PublishResource(producing),
        b"users": UsersResource(producing),
        b"push": PushResource(producing),
        b"health": HealthResource(broker, "redis" if config.uses_redis else "memory"),
        b"metrics": MetricsResource(metrics, producing.auth),
        b"pushd.js": StaticFile("pushd.js", b"text/javascript; charset=utf-8"),
    }
    for name, child in children.items():
        root.putChild(name, child)

    # Idle keep-alive connections go after a minute (the headers' own deadline is shorter).
    site_type = Site if config.access_log else QuietSite
    site = site_type(root, timeout=max(60.0, config.handshake_timeout), reactor=reactor)
    largest = max(config.max_message_size, config.max_batch_size)
    request_type = type("PushdRequest", (PushdRequest,), {"max_body": largest})
    site.requestFactory = request_type  # type: ignore[assignment]
    site.protocol = type(  # type: ignore[method-assign]
        "PushdChannel",
        (PushdChannel,),
        {
            "handshake_timeout": config.handshake_timeout,
            "max_header_size": config.max_header_size,
            "fast": FastPublish(producing, reactor),
        },
    )
    site.ws_factory = ws_factory  # type: ignore[attr-defined]
    site.streams = [children[b"sse"], children[b"stream"]]  # type: ignore[attr-defined]
    return site
