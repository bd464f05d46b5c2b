"""The producer API: `POST /channels/{channel}` publishes one message."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from pushd.broker import Broker, BrokerUnavailable
from pushd.message import data_from_body, dump_json, is_channel
from pushd.web import errors
from pushd.web.errors import ApiError
from pushd.web.resource import ApiResource, NotFound, ProducerAuth


class ChannelsResource(Resource):
    """`/channels/{channel}`: one child per channel, made per request."""

    def __init__(self, broker: Broker, auth: ProducerAuth) -> None:
        super().__init__()
        self._broker = broker
        self._auth = auth

    def getChild(self, path: bytes, request: Request) -> Resource:
        if request.postpath:
            return NotFound()
        return ChannelResource(path.decode("utf-8", "replace"), self._broker, self._auth)

    def render(self, request: Request) -> bytes:
        return NotFound().render(request)


class ChannelResource(ApiResource):
    def __init__(self, channel: str, broker: Broker, auth: ProducerAuth) -> None:
        super().__init__()
        self._channel = channel
        self._broker = broker
        self._auth = auth

    async def _publish(self, data: bytes) -> bytes:
        try:
            msg_id = await self._broker.publish(self._channel, data)
        except BrokerUnavailable:
            raise ApiError(*errors.UNAVAILABLE) from None
        return dump_json({"channel": self._channel, "id": msg_id})

    def handle_POST(self, request: Request) -> Coroutine[Any, Any, bytes]:
        self._auth.check(request)
        if not is_channel(self._channel):
            raise ApiError(*errors.BAD_CHANNEL)
        if getattr(request, "body_too_large", False):
            raise ApiError(*errors.TOO_LARGE)
        ctype = (request.getHeader(b"content-type") or b"").decode("latin-1")
        assert request.content is not None
        try:
            data = data_from_body(request.content.read(), ctype)
        except ValueError as e:
            error = errors.BAD_JSON if str(e) == "bad_json" else errors.BAD_TEXT
            raise ApiError(*error) from None
        return self._publish(data)
