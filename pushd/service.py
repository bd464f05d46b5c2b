"""makeService's wiring: broker, hub, one Site, one listener per endpoint."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from pushd import __version__
from pushd.auth import Authenticator, Gate, OriginPolicy, make_verifier
from pushd.auth_url import ConnectAuthorizer
from pushd.broker import Broker
from pushd.broker.memory import MemoryBroker
from pushd.config import Config
from pushd.hub import Hub
from pushd.limits import ConnectionCounter
from pushd.metrics import Metrics
from pushd.presence import Presence
from pushd.transports.websocket import PushdServerFactory
from pushd.web.site import make_site

log = Logger()


class StartupError(Exception):
    """A start-up failure that is said in one line, its str (twistd's
    traceback of it is replaced by that line: pushd.tap.one_line_failures)."""


class ListenFailed(StartupError, CannotListenError):
    """`description` (an endpoint string as given) cannot be listened on:
    `reason` in a few words ("address already in use"). Still a
    CannotListenError, which pushd.testing documents."""

    def __init__(self, description: str, error: BaseException) -> None:
        cause = error.socketError if isinstance(error, CannotListenError) else error
        CannotListenError.__init__(self, None, description, cause)
        self.description = description
        self.reason = in_words(cause)

    def __str__(self) -> str:
        return f"cannot listen on {self.description}: {self.reason}"


def in_words(error: BaseException) -> str:
    """An OS error as its words, lower case ("address already in use",
    "permission denied"); other errors as their message."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[:1].lower() + error.strerror[1:]
    return str(error) or type(error).__name__


def listening_url(port: Any, description: str) -> str:
    """Where clients reach `port`: `http://127.0.0.1:8080/`, `https://...` for
    a TLS endpoint (`ssl:`), `[::1]` for IPv6, the path of a unix socket."""
    host = port.getHost()
    path = getattr(host, "name", None)
    if path is not None:
        return os.fsdecode(path)
    address = getattr(host, "host", "")
    if ":" in address:
        address = f"[{address}]"
    scheme = "https" if description.split(":", 1)[0].lower() == "ssl" else "http"
    return f"{scheme}://{address}:{getattr(host, 'port', '')}/"


class Listener(Service):
    """Listens on one endpoint; `port` is the IListeningPort once listening.

    Unlike StreamServerEndpointService it exposes the port, which tests
    started on `tcp:0` need. With `demo`, the banner also gives the demo
    page's address.
    """

    def __init__(self, endpoint: Any, factory: Any, description: str, demo: bool = False) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.description = description
        self.demo = demo
        self.port: Any = None
        self.listening: Deferred[IListeningPort] = Deferred()

    def startService(self) -> None:
        Service.startService(self)
        self.listening = self.endpoint.listen(self.factory)
        self.listening.addCallbacks(self._listening, self._failed)
        # twistd must fail at start-up, not log later, when a port is taken.
        failure: list[Any] = []
        self.listening.addErrback(failure.append)
        if failure:
            failure[0].raiseException()

    def _failed(self, failure: Any) -> None:
        raise ListenFailed(self.description, failure.value)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        url = listening_url(port, self.description)
        log.info(
            "pushd {version} listening on {url}",
            version=__version__,
            url=url,
            endpoint=self.description,
        )
        if self.demo and "://" in url:
            log.info("the demo page: {demo_url}", demo_url=url)
        return port

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            stopped: Deferred[None] | None = port.stopListening()
            return stopped
        return None


class PushdService(MultiService):
    """Everything of one pushd process; stopping it is graceful: from the first
    moment no new request reaches the broker (503 shutting_down, `Connection:
    close` on every answer), stop accepting, say goodbye to clients (1001;
    streams end), answer the publishes in flight, then let go of the broker;
    all within --shutdown-timeout."""

    #: Seconds an idle keep-alive connection is kept open once stopping.
    idle_grace = 1.0
    #: Seconds for the 504s of abandoned publishes to be written, past the timeout.
    answer_grace = 1.0

    def __init__(
        self, config: Config, broker: Broker, hub: Hub, metrics: Metrics, reactor: Any
    ) -> None:
        MultiService.__init__(self)
        self.config = config
        self.broker = broker
        self.hub = hub
        self.metrics = metrics
        self.reactor = reactor
        self.listeners: list[Listener] = []
        self.site: Any = None
        self.presence: Presence | None = None

    async def _goodbye(self) -> None:
        # First, before anything can reach the broker: every answer from now on
        # closes its connection, and requests that arrive get 503 shutting_down.
        # Idle keep-alive connections stay open a moment, in case a request is
        # already on its way (closing under it would leave it unanswered).
        self.site.begin_stop(min(self.idle_grace, self.config.shutdown_timeout / 2))
        # Before clients go: their members leave all at once (another node
        # announces it), not one write and one event each.
        leaving = succeed(None)
        if self.presence is not None:
            leaving = self.broker.track(Deferred.fromCoroutine(self.presence.stop()))
        await gatherResults([maybeDeferred(lst.stopService) for lst in self.listeners])
        for streams in self.site.streams:
            streams.end_all()
        # The broker stays until every publish sent to it is answered, and every
        # connection has written its last answer (or close frame) and is lost:
        # `close_all` and `channels_gone` fire from the transports' connectionLost.
        websockets = self.site.ws_factory.close_all()
        streams = [s.all_gone() for s in self.site.streams if hasattr(s, "all_gone")]
        if await self._within(
            self.config.shutdown_timeout,
            websockets,
            leaving,
            self.broker.drain(),
            self.site.channels_gone(),
            *streams,
        ):
            return
        log.warn("shutdown timeout: closing what is left")
        # Publishes Redis has not answered get 504 outcome_unknown, written
        # before their connections close (a moment for that, no more).
        self.broker.abandon()
        if await self._within(
            self.answer_grace,
            websockets,
            self.broker.drain(),
            self.site.channels_gone(),
            *streams,
        ):
            return
        # Connections that still have not gone (a client that reads nothing) are
        # dropped, so that a stopped service holds no transport.
        held = [c for s in self.site.streams if hasattr(s, "connections") for c in s.connections()]
        for connection in (*self.site.channels, *self.site.ws_factory.clients, *held):
            if connection.transport is not None:
                connection.transport.abortConnection()
        await self._within(self.answer_grace, websockets, self.site.channels_gone(), *streams)

    async def _within(self, seconds: float, *waits: Deferred[Any]) -> bool:
        """True once every one of `waits` fired, False when `seconds` passed
        first. The waits are left alone either way: cancelling them (as
        `addTimeout` on their `gatherResults` would) fails them, and a
        gatherResults cancelled so answers FirstError, not TimeoutError."""
        result: Deferred[bool] = Deferred()

        def settle(value: bool) -> None:
            if not result.called:
                result.callback(value)

        gatherResults(list(waits), consumeErrors=True).addBoth(lambda _: settle(True))
        timer = self.reactor.callLater(seconds, settle, False)
        done = await result
        if timer.active():
            timer.cancel()
        return done

    def startService(self) -> None:
        # MultiService's, typed: callers under mypy --strict (pushd.testing) may call it.
        MultiService.startService(self)

    def stopService(self) -> Deferred[None]:
        async def stop() -> None:
            if self.site is not None:
                await self._goodbye()
            await maybeDeferred(MultiService.stopService, self)
            self.hub.stop()

        return Deferred.fromCoroutine(stop())

    def when_listening(self) -> Deferred[list[IListeningPort]]:
        d = DeferredList([lst.listening for lst in self.listeners], fireOnOneErrback=True)
        return d.addCallback(lambda results: [port for _, port in results])


class _Closing(Service):
    """Runs `close` when the service stops."""

    def __init__(self, close: Any) -> None:
        self._close = close

    def stopService(self) -> Any:
        Service.stopService(self)
        return self._close()


BACKLOG = 1024


def with_backlog(description: str) -> str:
    """Twisted's listen queue of 50 drops connects when clients come back together
    (after a restart): a `tcp:`, `ssl:` or `unix:` listener gets 1024 unless told."""
    kind = description.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6", "ssl", "unix") and "backlog=" not in description:
        return f"{description}:backlog={BACKLOG}"
    return description


def make_broker(config: Config, reactor: Any) -> Broker:
    if not config.uses_redis:
        return MemoryBroker(reactor, config.history_size, config.history_ttl)
    from pushd.broker.redis import RedisBroker

    return RedisBroker(
        reactor,
        config.shards,
        sentinels=config.redis_sentinel,
        prefix=config.redis_prefix,
        pool_size=config.redis_pool_size,
        timeout=config.redis_timeout,
        history_size=config.history_size,
        history_ttl=config.history_ttl,
        node_ttl=config.node_ttl,
    )


def make_service(config: Config, reactor: Any = None) -> PushdService:
    if reactor is None:
        from twisted.internet import reactor
    broker = make_broker(config, reactor)
    metrics = Metrics()
    presence = None
    if config.presence or config.join_leave:
        presence = Presence(
            broker,
            patterns=config.presence,
            join_leave=config.join_leave,
            max_list=config.max_presence_list,
            clock=reactor,
        )
    hub = Hub(
        broker,
        metrics,
        clock=reactor,
        announced=presence.announces if presence is not None else None,
    )
    metrics.watch(hub, broker)
    service = PushdService(config, broker, hub, metrics, reactor)
    Service.setServiceParent(broker, service)
    application = None
    if config.auth_url is not None:
        application = ConnectAuthorizer(config.auth_url, config.auth_timeout, reactor)
        Service.setServiceParent(_Closing(application.close), service)
    verifier = make_verifier(config, reactor)
    gate = Gate(
        Authenticator(verifier, application),
        OriginPolicy(config.allowed_origin),
        ConnectionCounter(config.max_connections_per_ip),
        metrics,
    )
    service.presence = presence
    if presence is not None:
        metrics.watch_presence(presence)
    ws_factory = PushdServerFactory(
        hub, broker, config, reactor=reactor, gate=gate, metrics=metrics, presence=presence
    )
    site = service.site = make_site(
        hub=hub,
        broker=broker,
        gate=gate,
        ws_factory=ws_factory,
        config=config,
        metrics=metrics,
        reactor=reactor,
        presence=presence,
    )
    demo = config.demo if config.demo is not None else not config.uses_redis
    for description in config.listen:
        endpoint = endpoints.serverFromString(reactor, with_backlog(description))
        listener = Listener(endpoint, site, description, demo)
        Service.setServiceParent(listener, service)
        service.listeners.append(listener)
    if site.admin is not None:
        from pushd.admin.stats import describe_address

        site.admin.stats.addresses = lambda: [
            describe_address(lst.port) if lst.port is not None else lst.description
            for lst in service.listeners
        ]
        Service.setServiceParent(site.admin, service)
    if not config.api_key:
        log.warn("no --api-key: the producer API answers loopback clients only")
    log.info(
        "pushd broker: {broker}",
        broker=config.redis_description() if config.uses_redis else "memory (one process)",
    )
    return service
