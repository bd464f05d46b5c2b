"""The producer API on `/channels`: publish, read history, look at a channel."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from pushd.broker import Broker, BrokerUnavailable
from pushd.message import data_from_body, dump_json, envelope, is_channel, parse_id
from pushd.web import errors
from pushd.web.errors import ApiError
from pushd.web.resource import ApiResource, NotFound, ProducerAuth

MAX_LIMIT = 10_000
IDEMPOTENCY_KEY_MAX = 256


class ChannelsResource(Resource):
    """`/channels/{channel}` and `/channels/{channel}/history`, made per request."""

    def __init__(
        self, broker: Broker, auth: ProducerAuth, default_limit: int, max_size: int
    ) -> None:
        super().__init__()
        self._broker = broker
        self._auth = auth
        self._default_limit = default_limit
        self._max_size = max_size

    def getChild(self, path: bytes, request: Request) -> Resource:
        channel = path.decode("utf-8", "replace")
        if not request.postpath:
            return ChannelResource(channel, self._broker, self._auth, self._max_size)
        if request.postpath == [b"history"]:
            assert request.prepath is not None
            request.prepath.append(request.postpath.pop())
            return HistoryResource(channel, self._broker, self._auth, self._default_limit)
        return NotFound()

    def render(self, request: Request) -> bytes:
        return NotFound().render(request)


async def _ask(d: Any) -> Any:
    try:
        return await d
    except BrokerUnavailable:
        raise ApiError(*errors.UNAVAILABLE) from None


class _ChannelApi(ApiResource):
    def __init__(self, channel: str, broker: Broker, auth: ProducerAuth) -> None:
        super().__init__()
        self._channel = channel
        self._broker = broker
        self._auth = auth

    def _checked(self, request: Request) -> None:
        self._auth.check(request)
        if not is_channel(self._channel):
            raise ApiError(*errors.BAD_CHANNEL)


class ChannelResource(_ChannelApi):
    def __init__(self, channel: str, broker: Broker, auth: ProducerAuth, max_size: int) -> None:
        super().__init__(channel, broker, auth)
        self._max_size = max_size

    async def _publish(self, data: bytes, idempotency_key: str | None) -> bytes:
        published = await _ask(self._broker.publish(self._channel, data, idempotency_key))
        return dump_json({"channel": self._channel, "id": published.id})

    def handle_POST(self, request: Request) -> Coroutine[Any, Any, bytes]:
        self._checked(request)
        key = idempotency_key(request)
        body = read_body(request, self._max_size)
        ctype = (request.getHeader(b"content-type") or b"").decode("latin-1")
        try:
            data = data_from_body(body, ctype)
        except ValueError as e:
            error = errors.BAD_JSON if str(e) == "bad_json" else errors.BAD_TEXT
            raise ApiError(*error) from None
        return self._publish(data, key)

    async def _describe(self) -> bytes:
        last_id = await _ask(self._broker.last_id(self._channel))
        subscribers = await _ask(self._broker.subscriber_count(self._channel))
        return dump_json({"channel": self._channel, "last_id": last_id, "subscribers": subscribers})

    def handle_GET(self, request: Request) -> Coroutine[Any, Any, bytes]:
        self._checked(request)
        return self._describe()


class HistoryResource(_ChannelApi):
    def __init__(
        self, channel: str, broker: Broker, auth: ProducerAuth, default_limit: int
    ) -> None:
        super().__init__(channel, broker, auth)
        self._default_limit = default_limit

    async def _read(self, since: str | None, limit: int) -> bytes:
        history = await _ask(self._broker.history(self._channel, since, limit))
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
        limit = self._default_limit
        if limit_text is not None:
            if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
                raise ApiError(*errors.BAD_LIMIT)
            limit = int(limit_text)
        return self._read(since, limit)


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
