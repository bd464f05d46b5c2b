"""pushd's Site: the resources of one process put together (`make_site`), and
the Site that knows its connections, so that a stop can be graceful."""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.http import combinedLogFormatter
from twisted.web.server import Site

from pushd.auth import Gate
from pushd.broker import Broker
from pushd.config import Config
from pushd.hub import Hub
from pushd.metrics import Metrics
from pushd.presence import Presence
from pushd.transports.ndjson import NdjsonResource
from pushd.transports.sse import SseResource
from pushd.transports.websocket import WebSocketEndpoint
from pushd.waiting import OpenConnections
from pushd.web.batch import PublishResource, PushResource
from pushd.web.channel import PushdChannel, PushdRequest
from pushd.web.control import UsersResource
from pushd.web.hotpath import FastPublish
from pushd.web.ops import HealthResource, MetricsAuth, MetricsResource
from pushd.web.producer import ChannelsResource, Producing
from pushd.web.resource import ProducerAuth
from pushd.web.static import Root, StaticFile

#: A token or key in a request's query (`/sse?token=...`): a credential, kept out of the log.
_CREDENTIAL_IN_QUERY = re.compile(r"([?&](?:token|api_key|key)=)[^&\s\"]*", re.IGNORECASE)


def access_log_line(timestamp: str, request: Any) -> str:
    """--access-log's line: Twisted's combined log format, with the value of
    a `token=` in the URL masked."""
    line: str = combinedLogFormatter(timestamp, request)
    return _CREDENTIAL_IN_QUERY.sub(r"\1***", line)


class PushdSite(Site):
    """The Site of one pushd process; it knows its connections, so that a stop
    can be graceful (`begin_stop`, `channels_gone`)."""

    #: No "Starting factory <PushdSite object at 0x...>": the banner says it (pushd.service).
    noisy = False
    #: From `begin_stop` on: no request reaches a resource, every answer closes.
    stopping = False
    stop_grace = 1.0
    fast: FastPublish | None = None
    ws_factory: Any = None
    streams: list[Any]
    #: The admin console (pushd.admin.Admin) when it is on.
    admin: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("logFormatter", access_log_line)
        Site.__init__(self, *args, **kwargs)
        self.channels: OpenConnections[PushdChannel] = OpenConnections()

    def begin_stop(self, grace: float) -> None:
        """From now on every answer carries `Connection: close` and requests get
        503 `shutting_down`; idle connections close after `grace` seconds."""
        self.stopping = True
        self.stop_grace = grace
        if self.fast is not None:
            self.fast.closing = True
        for channel in tuple(self.channels):
            channel.stop(grace)

    def channel_gone(self, channel: Any) -> None:
        self.channels.discard(channel)

    def channels_gone(self) -> Deferred[None]:
        """Fires once no HTTP connection is open (upgraded WebSockets aside)."""
        return self.channels.all_gone()


class QuietSite(PushdSite):
    """A Site without an access log: at push rates a line per request costs more than the push."""

    def log(self, request: Any) -> None:
        pass


def make_site(
    *,
    hub: Hub,
    broker: Broker,
    gate: Gate,
    ws_factory: Any,
    config: Config,
    metrics: Metrics,
    reactor: Any,
    presence: Presence | None = None,
) -> PushdSite:
    root = Root(config.demo if config.demo is not None else not config.uses_redis)
    producing = Producing(
        broker,
        ProducerAuth(config.api_key, config.trusted_proxies),
        metrics,
        config,
        reactor,
        verifier=gate.authenticator.verifier,
        presence=presence,
    )
    children: dict[bytes, Any] = {
        b"ws": WebSocketEndpoint(ws_factory),
        b"sse": SseResource(hub, broker, gate, config, reactor, metrics, presence),
        b"stream": NdjsonResource(hub, broker, gate, config, reactor, metrics, presence),
        b"channels": ChannelsResource(producing),
        b"publish": PublishResource(producing),
        b"users": UsersResource(producing),
        b"push": PushResource(producing),
        b"health": HealthResource(broker, "redis" if config.uses_redis else "memory"),
        b"metrics": MetricsResource(
            metrics, MetricsAuth(config.metrics_key, config.metrics_allow, producing.auth)
        ),
        b"pushd.js": StaticFile("pushd.js", b"text/javascript; charset=utf-8"),
    }
    admin = None
    if config.admin:
        from pushd.admin import Admin

        admin = Admin(
            config=config,
            broker=broker,
            hub=hub,
            metrics=metrics,
            presence=presence,
            producing=producing,
            reactor=reactor,
        )
        children[b"admin"] = admin.resource
    for name, child in children.items():
        root.putChild(name, child)

    # Idle keep-alive connections go after a minute (the headers' own deadline is shorter).
    # No form parsing: the contract has no form bodies, and /push's `c` is the query's.
    site_type = PushdSite if config.access_log else QuietSite
    site = site_type(
        root,
        timeout=max(60.0, config.handshake_timeout),
        reactor=reactor,
        parsePOSTFormSubmission=False,
    )
    limits = {
        "max_body": config.max_message_size,
        "max_bodies": {b"/publish": config.max_batch_size},
    }
    request_type = type("PushdRequest", (PushdRequest,), limits)
    site.requestFactory = request_type  # type: ignore[assignment]
    site.fast = FastPublish(producing, reactor)
    site.protocol = type(  # type: ignore[method-assign]
        "PushdChannel",
        (PushdChannel,),
        {
            "handshake_timeout": config.handshake_timeout,
            "max_header_size": config.max_header_size,
            "fast": site.fast,
        },
    )
    site.ws_factory = ws_factory
    site.streams = [children[b"sse"], children[b"stream"]]
    site.admin = admin
    if admin is not None:
        site.streams.append(admin.events)
    return site
