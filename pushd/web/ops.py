"""What operators and their tools ask: `GET /health` and `GET /metrics`."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.server import Request

from pushd.broker import Broker
from pushd.message import dump_json
from pushd.metrics import Metrics
from pushd.web.resource import ApiResource, ProducerAuth


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


class MetricsResource(ApiResource):
    """The Prometheus text format; protected like the producer API."""

    content_type = CONTENT_TYPE_LATEST.encode()

    def __init__(self, metrics: Metrics, auth: ProducerAuth) -> None:
        super().__init__()
        self._metrics = metrics
        self._auth = auth

    def handle_GET(self, request: Request) -> Any:
        self._auth.check(request)
        return generate_latest(self._metrics.registry)
