"""The admin console at `/admin`: a page an operator keeps open to see and
steer a live pushd cluster (pushd/static/admin: index.html, admin.js,
admin.css; hand-written, no build step), and the JSON API behind it
(pushd.admin.api). On with `--admin-password` or `--admin-key`; otherwise
`/admin` is not there (404).

`Admin` is a service: every second (`tick`) it writes this node's stats and
reads every node's (pushd.admin.stats), and pushes the view to the pages
that watch (`GET /admin/api/events`).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.util import redirectTo

from pushd.admin.api import ApiRoot, Events
from pushd.admin.auth import AdminAuth
from pushd.admin.stats import NodeStats
from pushd.broker import Broker
from pushd.config import Config
from pushd.hub import Hub
from pushd.metrics import Metrics
from pushd.presence import Presence
from pushd.web.producer import Producing
from pushd.web.resource import NotFound
from pushd.web.static import StaticFile

log = Logger()

#: Seconds between two views.
TICK = 1.0

#: The page's files: name -> content type.
FILES = {
    b"": ("index.html", b"text/html; charset=utf-8"),
    b"admin.js": ("admin.js", b"text/javascript; charset=utf-8"),
    b"admin.css": ("admin.css", b"text/css; charset=utf-8"),
}
#: The page loads its own files only, and no other site may frame it.
SECURITY_HEADERS = {
    b"content-security-policy": b"default-src 'self'; img-src 'self' data:; "
    b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    b"x-frame-options": b"DENY",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
}


class AdminRoot(Resource):
    """`/admin`: redirects to `/admin/` (the page's own URLs are relative)."""

    def __init__(self, api: Resource) -> None:
        Resource.__init__(self)
        self._api = api

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"api":
            return self._api
        if path in FILES and not request.postpath:
            name, content_type = FILES[path]
            return StaticFile(f"admin/{name}", content_type, SECURITY_HEADERS)
        return NotFound()

    def render_GET(self, request: Request) -> bytes:
        body: bytes = redirectTo(b"/admin/", request)  # type: ignore[arg-type]
        return body


class Admin(Service):
    """The console of one node: its resource (`resource`, at /admin), its
    event streams (`events`) and the ticks that feed them."""

    name = "admin"

    def __init__(
        self,
        *,
        config: Config,
        broker: Broker,
        hub: Hub,
        metrics: Metrics,
        presence: Presence | None,
        producing: Producing,
        reactor: Any,
    ) -> None:
        self._config = config
        self._broker = broker
        self.auth = AdminAuth(
            config.admin_password, config.admin_key, reactor, config.trusted_proxies
        )
        self.stats = NodeStats(
            config=config,
            broker=broker,
            hub=hub,
            metrics=metrics,
            presence=presence,
            clock=reactor,
        )
        self.events = Events(self.auth)
        api = ApiRoot(self.auth, self.events, producing, hub, broker, presence)
        self.resource = AdminRoot(api)
        self._loop = LoopingCall(self.tick)
        self._loop.clock = reactor
        self._ticking = False

    def tick(self) -> Deferred[None] | None:
        """Exchange the stats, push the view (a tick still running is not doubled)."""
        if self._ticking:
            return None
        self._ticking = True

        async def run() -> None:
            try:
                view = await self.stats.exchange(self._config.node_ttl)
            finally:
                self._ticking = False
            self.events.broadcast(view)

        d = Deferred.fromCoroutine(run())
        d.addErrback(lambda f: log.failure("the admin console's stats failed", f))
        return None

    def startService(self) -> None:
        Service.startService(self)
        self._loop.start(TICK, now=True)

    def stopService(self) -> Deferred[Any] | None:
        Service.stopService(self)
        if self._loop.running:
            self._loop.stop()
        self.events.end_all()
        if not self._broker.connected:
            return None
        d = self._broker.track(self.stats.leave())
        return d.addErrback(lambda _: None)
