"""Server-side control by the application: address users and channels on every node.

  POST   /users/{user}                   publish to the user's personal channel
  POST   /users/{user}/subscribe         {"channel": ..} every live connection of the user joins it
  POST   /users/{user}/unsubscribe       {"channel": ..} ... leaves it (`unsubscribed`)
  POST   /users/{user}/disconnect        ... is closed with 4003 (streams end)
  DELETE /channels/{channel}             (pushd.web.producer) every subscriber leaves it,
                                         its history is dropped

The commands answer `200 {"nodes": n}`, the nodes that carried them out; the
producer API's auth applies.
"""

from __future__ import annotations

import re
from collections.abc import Coroutine
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from pushd.message import dump_json, is_channel, load_json
from pushd.web import errors
from pushd.web.errors import ApiError
from pushd.web.producer import Collection, Producing, idempotency_key, message_data, read_body
from pushd.web.resource import ApiResource

#: A user id as tokens carry it (`sub`): any text of 1 to 256 characters but
#: control characters (an identity provider's `auth0|5f7c...` included).
USER_RE = re.compile(r"[^\x00-\x1f\x7f]{1,256}")
BAD_USER = (400, "bad_user", "a user id is 1 to 256 characters, none a control character")
COMMANDS = (b"subscribe", b"unsubscribe", b"disconnect")


class UsersResource(Collection):
    """`/users/{user}` and `/users/{user}/{command}`, made per request."""

    def child(self, name: str, request: Request) -> Resource | None:
        if not request.postpath:
            return UserResource(name, self._p)
        if len(request.postpath) == 1 and request.postpath[0] in COMMANDS:
            assert request.prepath is not None
            command = request.postpath.pop()
            request.prepath.append(command)
            return UserCommand(name, command.decode(), self._p)
        return None


class _UserApi(ApiResource):
    def __init__(self, user: str, producing: Producing) -> None:
        super().__init__()
        self._user = user
        self._p = producing

    def _checked(self, request: Request) -> None:
        self._p.auth.check(request)
        if USER_RE.fullmatch(self._user) is None:
            raise ApiError(*BAD_USER)


class UserResource(_UserApi):
    """`POST /users/{user}`: a message to every device of the user, with history."""

    async def _publish(self, channel: str, data: bytes, key: str | None) -> bytes:
        d = self._p.broker.publish(channel, data, key)
        published = await self._p.publish("users", d)
        return dump_json({"channel": channel, "id": published.id})

    def handle_POST(self, request: Request) -> Coroutine[Any, Any, bytes]:
        self._checked(request)
        channel = self._p.config.personal(self._user)
        if channel is None:
            raise ApiError(
                400, "bad_user", "this user id fits no channel name: no personal channel"
            )
        key = idempotency_key(request)
        data = message_data(request, self._p.config.max_message_size)
        return self._publish(channel, data, key)


class UserCommand(_UserApi):
    """`POST /users/{user}/subscribe|unsubscribe|disconnect`."""

    def __init__(self, user: str, name: str, producing: Producing) -> None:
        super().__init__(user, producing)
        self._name = name

    def handle_POST(self, request: Request) -> Coroutine[Any, Any, bytes]:
        self._checked(request)
        body: dict[str, Any] = {"cmd": self._name, "user": self._user}
        if self._name != "disconnect":
            raw = read_body(request, self._p.config.max_message_size)
            try:
                given = load_json(raw)
            except ValueError:
                raise ApiError(*errors.BAD_JSON) from None
            channel = given.get("channel") if isinstance(given, dict) else None
            if not isinstance(channel, str) or not is_channel(channel):
                raise ApiError(*errors.BAD_CHANNEL)
            body["channel"] = channel
        return self._p.command(body)
