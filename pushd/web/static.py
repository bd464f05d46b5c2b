"""`/` and the files shipped in pushd/static (the demo page, pushd.js)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from importlib.resources import files

from twisted.web.resource import Resource
from twisted.web.server import Request

from pushd import __version__
from pushd.message import dump_json
from pushd.web.resource import NotFound


class Root(Resource):
    """`/`: the demo page when it is on, else what this server is, as JSON."""

    def __init__(self, demo: bool) -> None:
        Resource.__init__(self)
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
    """A file shipped in pushd/static (`name` a path below it, e.g.
    "admin/index.html"), read once, sent with `headers` besides its type."""

    isLeaf = True

    def __init__(
        self, name: str, content_type: bytes, headers: Mapping[bytes, bytes] | None = None
    ) -> None:
        Resource.__init__(self)
        self._name = name
        self._content_type = content_type
        self._headers = headers or {}

    def render_GET(self, request: Request) -> bytes:
        for name, value in self._headers.items():
            request.setHeader(name, value)
        return static_file(request, self._name, self._content_type)


def static_file(request: Request, name: str, content_type: bytes) -> bytes:
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-cache")
    return _static(name)


@lru_cache(maxsize=16)
def _static(name: str) -> bytes:
    return (files("pushd") / "static").joinpath(*name.split("/")).read_bytes()
