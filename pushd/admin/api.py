"""The admin JSON API, `/admin/api/*` (the README's "Admin console"):

  POST   /admin/api/login                       {"password": ..} -> 204 + the cookie
  POST   /admin/api/logout                      -> 204, the cookie cleared
  GET    /admin/api/session                     {"authenticated": bool} (no auth needed)
  GET    /admin/api/nodes                       the view of all nodes (pushd.admin.stats)
  GET    /admin/api/events                      text/event-stream: `event: stats` each second
  GET    /admin/api/channels/{channel}          last id, subscribers, last messages, presence
  POST   /admin/api/channels/{channel}/publish  {"data": <JSON>} -> {"channel", "id"}
  DELETE /admin/api/channels/{channel}          -> {"nodes": n}
  POST   /admin/api/users/{user}/disconnect     -> {"nodes": n} (close code 4003)
  POST   /admin/api/users/{user}/unsubscribe    {"channel": ..} -> {"nodes": n}

Every call but login needs the login cookie or an admin key (pushd.admin.auth,
which also says the CSRF rule); errors are the producer API's JSON. The
actions are the producer API's own (pushd.web.producer.Producing).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, cast

from twisted.internet.interfaces import IPushProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from pushd.admin.auth import WRONG_PASSWORD, AdminAuth
from pushd.broker import Broker
from pushd.hub import Hub
from pushd.limits import SendBound
from pushd.message import dump_json, envelope, is_channel, load_json
from pushd.presence import Presence
from pushd.web import errors
from pushd.web.control import BAD_USER, USER_RE
from pushd.web.errors import ApiError
from pushd.web.producer import Producing, ask, read_body
from pushd.web.resource import ApiResource, NotFound

#: Messages of a channel's history the channel view shows.
LAST_MESSAGES = 20
#: Bytes of events queued for a page that does not read before it is cut off.
MAX_BACKLOG = 1 << 20
BAD_BODY = (400, "bad_body", 'expected a JSON object, e.g. {"data": ...}')


def _no_store(request: Request) -> None:
    request.setHeader(b"cache-control", b"no-store")


class AdminApi(ApiResource):
    """An admin API resource: authenticated (but `open`), CSRF-checked on actions."""

    #: No authentication needed (login).
    open = False

    def __init__(self, auth: AdminAuth) -> None:
        super().__init__()
        self._auth = auth

    def render(self, request: Request) -> Any:
        _no_store(request)
        try:
            how = None if self.open else self._auth.check(request)
            if request.method not in (b"GET", b"HEAD") and (how is None or how == "cookie"):
                self._auth.check_csrf(request)
        except ApiError as e:
            if e.status == 401:
                request.setHeader(b"www-authenticate", b'Bearer realm="pushd admin"')
            return self._answer(request, e.status, self.error_body(e))
        return super().render(request)


def _json_object(request: Request, max_size: int) -> dict[str, Any]:
    raw = read_body(request, max_size)
    try:
        body = load_json(raw)
    except ValueError:
        raise ApiError(*errors.BAD_JSON) from None
    if not isinstance(body, dict):
        raise ApiError(*BAD_BODY)
    return body


class Login(AdminApi):
    open = True

    def handle_POST(self, request: Request) -> bytes:
        self._auth.take_attempt(request)
        body = _json_object(request, 4096)
        password = body.get("password")
        if not isinstance(password, str) or not self._auth.password_ok(password):
            raise ApiError(*WRONG_PASSWORD)
        self._auth.set_cookie(request, self._auth.make_cookie(), 43200)
        return b""

    def _answer(self, request: Request, status: int, body: bytes) -> bytes:
        if status != 200:
            return super()._answer(request, status, body)
        return _no_content(request)


def _no_content(request: Request) -> bytes:
    request.setResponseCode(204)
    # Finished here: a 204 carries no Content-Length (RFC 9110 8.6).
    request.write(b"")
    request.finish()
    # NOT_DONE_YET, where ApiResource expects the body: twisted.web writes nothing more.
    return cast(bytes, NOT_DONE_YET)


class Logout(AdminApi):
    open = True

    def handle_POST(self, request: Request) -> Any:
        self._auth.set_cookie(request, b"", 0)
        return b""

    def _answer(self, request: Request, status: int, body: bytes) -> bytes:
        if status != 200:
            return super()._answer(request, status, body)
        return _no_content(request)


class Session(AdminApi):
    """`GET /admin/api/session`: `{"authenticated": true|false}`, for the page
    to know whether to show its login form (200 either way)."""

    open = True

    def handle_GET(self, request: Request) -> bytes:
        return dump_json({"authenticated": self._auth.how(request) is not None})


class Nodes(AdminApi):
    def __init__(self, auth: AdminAuth, events: Events) -> None:
        super().__init__(auth)
        self._events = events

    def handle_GET(self, request: Request) -> bytes:
        return self._events.view


@implementer(IPushProducer)
class _Watcher(SendBound):
    """An event stream's producer: counts what waits for a page that stopped reading."""

    __slots__ = ()

    def __init__(self) -> None:
        self._paused = False
        self._backlog = 0
        self.replaying = False

    def stopProducing(self) -> None:
        pass


class Events(Resource):
    """`GET /admin/api/events`: the view of all nodes as `event: stats` once a
    second (`broadcast`), the latest at once. Ended with the service (`end_all`),
    and when the cookie it was opened with expires."""

    isLeaf = True

    def __init__(self, auth: AdminAuth) -> None:
        Resource.__init__(self)
        self._auth = auth
        self._requests: dict[Request, _Watcher] = {}
        #: The latest view (JSON).
        self.view = b'{"nodes":[]}'

    def render_GET(self, request: Request) -> Any:
        _no_store(request)
        try:
            self._auth.check(request)
        except ApiError as e:
            errors.write_error(request, e.status, e.code, e.message)
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"x-accel-buffering", b"no")
        request.write(b": ok\nretry: 2000\n\n" + self._event())
        watcher = _Watcher()
        request.registerProducer(watcher, True)
        self._requests[request] = watcher
        request.notifyFinish().addBoth(lambda _: self._requests.pop(request, None))
        return NOT_DONE_YET

    def _event(self) -> bytes:
        return b"event: stats\ndata: " + self.view + b"\n\n"

    def broadcast(self, view: bytes) -> None:
        self.view = view
        event = self._event()
        for request, watcher in tuple(self._requests.items()):
            if request.finished or request._disconnected:
                continue
            if self._auth.how(request) is None:
                # Its cookie expired: the stream ends with it, as a token's does.
                self._requests.pop(request, None)
                request.channel.persistent = False  # the page's next request asks anew
                request.finish()
                transport: Any = request.channel.transport
                if transport is not None:
                    transport.loseConnection()
                continue
            if watcher.over(len(event), MAX_BACKLOG):
                # A page that reads nothing is cut off, not queued for.
                self._requests.pop(request, None)
                transport = request.channel.transport
                if transport is not None:
                    transport.abortConnection()
                continue
            request.write(event)

    def end_all(self) -> None:
        """End every stream (the service is stopping)."""
        for request in tuple(self._requests):
            if not request.finished and not request._disconnected:
                request.finish()
        self._requests.clear()


class _ChannelApi(AdminApi):
    def __init__(
        self,
        auth: AdminAuth,
        channel: str,
        producing: Producing,
        hub: Hub,
        presence: Presence | None,
    ) -> None:
        super().__init__(auth)
        self._channel = channel
        self._p = producing
        self._hub = hub
        self._presence = presence

    def _checked(self) -> None:
        if not is_channel(self._channel):
            raise ApiError(*errors.BAD_CHANNEL)


class ChannelInfo(_ChannelApi):
    """`GET /admin/api/channels/{channel}` and `DELETE` it."""

    async def _info(self) -> bytes:
        channel, broker = self._channel, self._p.broker
        last_id = await ask(broker.last_id(channel), reading=True)
        subscribers = await ask(broker.subscriber_count(channel), reading=True)
        history = await ask(broker.history(channel, None, LAST_MESSAGES), reading=True)
        presence = b"null"
        if self._presence is not None and self._presence.tracks(channel):
            presence = await ask(self._presence.query(channel), reading=True)
        messages = b",".join(envelope(channel, i, data) for i, data in history.messages)
        return (
            b'{"channel":'
            + dump_json(channel)
            + b',"last_id":'
            + dump_json(last_id)
            + b',"subscribers":'
            + dump_json(subscribers)
            + b',"local_subscribers":'
            + dump_json(self._hub.count(channel))
            + b',"messages":['
            + messages
            + b'],"presence":'
            + presence
            + b"}"
        )

    def handle_GET(self, request: Request) -> Coroutine[Any, Any, bytes]:
        self._checked()
        return self._info()

    def handle_DELETE(self, request: Request) -> Coroutine[Any, Any, bytes]:
        self._checked()
        return self._p.command({"cmd": "destroy", "channel": self._channel})


class ChannelPublish(_ChannelApi):
    """`POST /admin/api/channels/{channel}/publish` `{"data": <JSON>}`."""

    async def _publish(self, data: bytes) -> bytes:
        published = await self._p.publish("admin", self._p.broker.publish(self._channel, data))
        return dump_json({"channel": self._channel, "id": published.id})

    def handle_POST(self, request: Request) -> Coroutine[Any, Any, bytes]:
        self._checked()
        size = self._p.config.max_message_size
        body = _json_object(request, size)
        if "data" not in body:
            raise ApiError(*BAD_BODY)
        data = dump_json(body["data"])
        if len(data) > size:
            raise ApiError(*errors.TOO_LARGE)
        return self._publish(data)


class UserCommand(AdminApi):
    """`POST /admin/api/users/{user}/disconnect|unsubscribe`."""

    def __init__(self, auth: AdminAuth, user: str, name: str, producing: Producing) -> None:
        super().__init__(auth)
        self._user = user
        self._name = name
        self._p = producing

    def handle_POST(self, request: Request) -> Coroutine[Any, Any, bytes]:
        if USER_RE.fullmatch(self._user) is None:
            raise ApiError(*BAD_USER)
        command: dict[str, Any] = {"cmd": self._name, "user": self._user}
        if self._name == "unsubscribe":
            channel = _json_object(request, 4096).get("channel")
            if not isinstance(channel, str) or not is_channel(channel):
                raise ApiError(*errors.BAD_CHANNEL)
            command["channel"] = channel
        return self._p.command(command)


class ApiRoot(Resource):
    """`/admin/api/...`: resources made per request from the path."""

    def __init__(
        self,
        auth: AdminAuth,
        events: Events,
        producing: Producing,
        hub: Hub,
        broker: Broker,
        presence: Presence | None,
    ) -> None:
        Resource.__init__(self)
        self._auth = auth
        self._events = events
        self._p = producing
        self._hub = hub
        self._presence = presence

    def render(self, request: Request) -> bytes:
        return NotFound().render(request)

    def getChild(self, path: bytes, request: Request) -> Resource:
        rest = request.postpath or []
        found = self._child(path, rest)
        if found is None:
            return NotFound()
        resource, used = found
        assert request.prepath is not None
        for _ in range(used):
            request.prepath.append(rest.pop(0))
        return resource

    def _child(self, path: bytes, rest: list[bytes]) -> tuple[Resource, int] | None:
        auth = self._auth
        if not rest:
            simple: dict[bytes, Resource] = {
                b"login": Login(auth),
                b"logout": Logout(auth),
                b"session": Session(auth),
                b"nodes": Nodes(auth, self._events),
                b"events": self._events,
            }
            return (simple[path], 0) if path in simple else None
        name = rest[0].decode("utf-8", "replace")
        if path == b"channels" and len(rest) == 1:
            return ChannelInfo(auth, name, self._p, self._hub, self._presence), 1
        if path == b"channels" and rest[1:] == [b"publish"]:
            return ChannelPublish(auth, name, self._p, self._hub, self._presence), 2
        if path == b"users" and len(rest) == 2 and rest[1] in (b"disconnect", b"unsubscribe"):
            return UserCommand(auth, name, rest[1].decode(), self._p), 2
        return None
