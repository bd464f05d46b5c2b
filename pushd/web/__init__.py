"""pushd's HTTP side: one Site serving the producer API and the WebSocket endpoint."""

from __future__ import annotations

from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from pushd import __version__
from pushd.broker import Broker
from pushd.message import dump_json
from pushd.web.producer import ChannelsResource
from pushd.web.resource import NotFound, ProducerAuth


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


class QuietSite(Site):
    """A Site without an access log: at push rates a line per request costs more than the push."""

    def log(self, request: Any) -> None:
        pass


class Root(Resource):
    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"" and not request.postpath:
            return self
        return NotFound()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return dump_json({"service": "pushd", "version": __version__})


def make_site(
    *,
    broker: Broker,
    ws_factory: Any,
    api_keys: tuple[str, ...],
    max_body: int,
    history_size: int = 100,
    access_log: bool = False,
) -> Site:
    root = Root()
    root.putChild(b"ws", WebSocketResource(ws_factory))  # type: ignore[arg-type]
    channels = ChannelsResource(broker, ProducerAuth(api_keys), history_size)
    root.putChild(b"channels", channels)  # type: ignore[arg-type]

    site = Site(root) if access_log else QuietSite(root)
    request_type = type("PushdRequest", (PushdRequest,), {"max_body": max_body})
    site.requestFactory = request_type  # type: ignore[assignment]
    site.ws_factory = ws_factory  # type: ignore[attr-defined]
    return site
