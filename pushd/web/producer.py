"""The producer API on `/channels`: publish, read history, look at a channel."""

from __future__ import annotations

import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Request

from pushd.broker import Broker, BrokerUnavailable
from pushd.config import Config
from pushd.message import data_from_body, dump_json, envelope, is_channel, parse_id
from pushd.metrics import Metrics
from pushd.web import errors
from pushd.web.errors import ApiError
from pushd.web.resource import ApiResource, NotFound, ProducerAuth

MAX_LIMIT = 10_000
IDEMPOTENCY_KEY_MAX = 256


@dataclass(frozen=True)
class Producing:
    """What every producer resource works with."""

    broker: Broker
    auth: ProducerAuth
    metrics: Metrics
    config: Config

    async def publish(self, api: str, d: Deferred[Any], count: int = 1) -> Any:
        """Wait for a publish: 503 when the broker could not take it; counted and timed."""
        start = time.monotonic()
        result = await ask(d)
        self.metrics.published.labels(api).inc(count)
        self.metrics.publish_seconds.observe(time.monotonic() - start)
        return result


class ChannelsResource(Resource):
    """`/channels/{channel}` and `/channels/{channel}/history`, made per request."""

    def __init__(self, producing: Producing) -> None:
        super().__init__()
        self._p = producing

    def getChild(self, path: bytes, request: Request) -> Resource:
        channel = path.decode("utf-8", "replace")
        if not request.postpath:
            return ChannelResource(channel, self._p)
        if request.postpath == [b"history"]:
            assert request.prepath is not None
            request.prepath.append(request.postpath.pop())
            return HistoryResource(channel, self._p)
        return NotFound()

    def render(self, request: Request) -> bytes:
        return NotFound().render(request)


async def ask(d: Any) -> Any:
    """A broker's answer; 503 when it could not give one."""
    try:
        return await d
    except BrokerUnavailable:
        raise ApiError(*errors.UNAVAILABLE) from None


class _ChannelApi(ApiResource):
    def __init__(self, channel: str, producing: Producing) -> None:
        super().__init__()
        self._channel = channel
        self._p = producing
        self._broker = producing.broker

    def _checked(self, request: Request) -> None:
        self._p.auth.check(request)
        if not is_channel(self._channel):
            raise ApiError(*errors.BAD_CHANNEL)


class ChannelResource(_ChannelApi):
    async def _publish(self, data: bytes, idempotency_key: str | None) -> bytes:
        d = self._broker.publish(self._channel, data, idempotency_key)
        published = await self._p.publish("channels", d)
        return dump_json({"channel": self._channel, "id": published.id})

    def handle_POST(self, request: Request) -> Coroutine[Any, Any, bytes]:
        self._checked(request)
        key = idempotency_key(request)
        return self._publish(message_data(request, self._p.config.max_message_size), key)

    async def _describe(self) -> bytes:
        last_id = await ask(self._broker.last_id(self._channel))
        subscribers = await ask(self._broker.subscriber_count(self._channel))
        return dump_json({"channel": self._channel, "last_id": last_id, "subscribers": subscribers})

    def handle_GET(self, request: Request) -> Coroutine[Any, Any, bytes]:
        self._checked(request)
        return self._describe()

    def handle_DELETE(self, request: Request) -> Coroutine[Any, Any, bytes]:
        """Every subscriber on every node leaves the channel; its history goes."""
        from pushd.web.control import command

        self._checked(request)
        return command(self._p, {"cmd": "destroy", "channel": self._channel})


class HistoryResource(_ChannelApi):
    async def _read(self, since: str | None, limit: int) -> bytes:
        history = await ask(self._broker.history(self._channel, since, limit))
        return (
            b'{"messages":['
            + b",".join(envelope(self._channel, msg_id, data) for msg_id, data in history.messages)
            + b"]}"
        )

    def handle_GET(self, request: Request) -> Coroutine[Any, Any, bytes]:
        self._checked(request)
        since = query_value(request, b"since")
        if since is not None:
            try:
                parse_id(since)
            except ValueError:
                raise ApiError(*errors.BAD_SINCE) from None
        limit_text = query_value(request, b"limit")
        limit = self._p.config.history_size
        if limit_text is not None:
            if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
                raise ApiError(*errors.BAD_LIMIT)
            limit = int(limit_text)
        return self._read(since, limit)


def message_data(request: Request, max_size: int) -> bytes:
    """A message's data from a request's body (JSON or text), as compact JSON."""
    body = read_body(request, max_size)
    ctype = (request.getHeader(b"content-type") or b"").decode("latin-1")
    try:
        return data_from_body(body, ctype)
    except ValueError as e:
        raise ApiError(*(errors.BAD_JSON if str(e) == "bad_json" else errors.BAD_TEXT)) from None


def read_body(request: Request, max_size: int) -> bytes:
    """The body, or 413 when it is over `max_size` (or was cut off at the site's cap)."""
    assert request.content is not None
    body = request.content.read(max_size + 1)
    if getattr(request, "body_too_large", False) or len(body) > max_size:
        raise ApiError(*errors.TOO_LARGE)
    return body


def query_value(request: Request, name: bytes) -> str | None:
    values = (request.args or {}).get(name)
    return values[-1].decode("utf-8", "replace") if values else None


def idempotency_key(request: Request) -> str | None:
    raw = request.getHeader(b"idempotency-key")
    if raw is None:
        return None
    key = raw.decode("latin-1").strip()
    if not key or len(key) > IDEMPOTENCY_KEY_MAX or not key.isprintable():
        raise ApiError(*errors.BAD_IDEMPOTENCY_KEY)
    return key
