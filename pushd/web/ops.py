"""What operators and their tools ask: `GET /health` and `GET /metrics`."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.server import Request

from pushd.auth import is_loopback_host
from pushd.broker import Broker
from pushd.message import dump_json
from pushd.metrics import Metrics
from pushd.web.errors import ApiError, Refusal
from pushd.web.resource import ApiResource, ProducerAuth, bearer_matches, request_host


class HealthResource(ApiResource):
    """For load balancers and orchestrators, so open to all and revealing
    nothing private: `{"status": "ok" | "degraded" | "down", "broker": <kind>,
    "broker_up": <bool>, "shards": [{"redis": "host:port", "up": <bool>,
    "same_list": <bool>}...]}`.
    "ok" (200): every Redis shard connected (or the memory broker);
    "degraded" (200): some are, and only the channels of the others fail, or
    this node's --redis list differs from the other nodes' (`same_list`
    false on a shard: its messages go where the others do not look);
    "down" (503): none is."""

    def __init__(self, broker: Broker, kind: str) -> None:
        super().__init__()
        self._broker = broker
        self._kind = kind

    def handle_GET(self, request: Request) -> bytes:
        shards = self._broker.shards()
        up = sum(shard.up for shard in shards)
        if not shards or (up == len(shards) and all(s.same_list for s in shards)):
            status = "ok"
        elif up:
            status = "degraded"
        else:
            status = "down"
            request.setResponseCode(503)
        return dump_json(
            {
                "status": status,
                "broker": self._kind,
                "broker_up": status != "down",
                "shards": [
                    {"redis": shard.name, "up": shard.up, "same_list": shard.same_list}
                    for shard in shards
                ],
            }
        )

    def _answer(self, request: Request, status: int, body: bytes) -> bytes:
        # handle_GET chose the status itself.
        return super()._answer(request, request.code if status == 200 else status, body)


_METRICS_UNAUTHORIZED = Refusal(
    401, "unauthorized", "a valid metrics key is required (Authorization: Bearer <key>)"
)
_METRICS_FORBIDDEN = Refusal(
    403,
    "forbidden",
    "no --metrics-key is configured: /metrics answers loopback and --metrics-allow clients only",
)


class MetricsAuth:
    """Who may scrape `/metrics`. With `--metrics-key`: a metrics key, or a
    client in a `--metrics-allow` network; producer keys and loopback no longer
    count (a key asked for authenticated scrapes; behind a proxy loopback may
    be anyone). Without: loopback and `--metrics-allow` clients, and, as before
    metrics keys existed, a producer key."""

    def __init__(
        self,
        keys: tuple[str, ...],
        allow: tuple[IPv4Network | IPv6Network | str, ...],
        producer: ProducerAuth,
    ) -> None:
        self._keys = [k.encode() for k in keys]
        # Networks from pushd.config, or strings from pushd.testing's make_config.
        self._allow = tuple(ip_network(str(network), strict=False) for network in allow)
        self._producer = producer

    def refusal(self, authorization: bytes | None, host: str) -> Refusal | None:
        """Why a scrape from `host` (pushd.auth.client_host's) may not read, or None."""
        if self._keys:
            if bearer_matches(authorization, self._keys):
                return None
        elif is_loopback_host(host) or (
            self._producer.has_keys
            and self._producer.refusal(authorization, lambda: host, None) is None
        ):
            return None
        if self._allow and _in_networks(host, self._allow):
            return None
        if self._keys or self._producer.has_keys:
            return _METRICS_UNAUTHORIZED
        return _METRICS_FORBIDDEN

    def check(self, request: Request) -> None:
        host = request_host(request, self._producer.trusted_proxies)
        refusal = self.refusal(request.getHeader(b"authorization"), host)
        if refusal is not None:
            if refusal is _METRICS_UNAUTHORIZED:
                request.setHeader(b"www-authenticate", b'Bearer realm="pushd metrics"')
            raise ApiError(*refusal)


def _in_networks(host: str, networks: tuple[IPv4Network | IPv6Network, ...]) -> bool:
    try:
        address = ip_address(host.split("%", 1)[0])
    except ValueError:
        return False  # "local": a unix socket's client
    # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
    mapped = getattr(address, "ipv4_mapped", None)
    return any(address in net or (mapped is not None and mapped in net) for net in networks)


class MetricsResource(ApiResource):
    """The Prometheus text format, for whom MetricsAuth admits."""

    content_type = CONTENT_TYPE_LATEST.encode()

    def __init__(self, metrics: Metrics, auth: MetricsAuth) -> None:
        super().__init__()
        self._metrics = metrics
        self._auth = auth

    def handle_GET(self, request: Request) -> Any:
        self._auth.check(request)
        return generate_latest(self._metrics.registry)
