"""The producer API on `/channels`: publish, read history, look at a channel."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from pushd.auth import AuthError, Grants, OriginPolicy, TokenVerifier, token_from
from pushd.broker import Broker, BrokerUnavailable, IdempotencyKeyReused, OutcomeUnknown
from pushd.config import Config
from pushd.limits import KeyedBuckets
from pushd.message import data_from_body, dump_json, envelope, is_channel, parse_id
from pushd.metrics import Metrics
from pushd.presence import Presence
from pushd.web import errors
from pushd.web.errors import ApiError
from pushd.web.resource import ApiResource, NotFound, ProducerAuth, request_host

MAX_LIMIT = 10_000
IDEMPOTENCY_KEY_MAX = 256


@dataclass(frozen=True)
class Producing:
    """What every producer resource works with."""

    broker: Broker
    auth: ProducerAuth
    metrics: Metrics
    config: Config
    #: Its clock: the browsers' publish rates (IReactorTime).
    reactor: Any
    #: The subscribers' token verifier (pushd.auth.make_verifier), which browsers'
    #: tokens go through too; None: no token is accepted.
    verifier: TokenVerifier | None = None
    #: The node's presence, when --presence or --join-leave name channels.
    presence: Presence | None = None

    @cached_property
    def browsers(self) -> BrowserPublish:
        """Publishing from browser pages with subscriber tokens (made when first needed)."""
        return BrowserPublish(self.config, self.reactor, self.verifier)

    async def publish(self, api: str, d: Deferred[Any], count: int = 1) -> Any:
        """Wait for a publish (errors: `ask`); counted and timed."""
        start = time.monotonic()
        result = await ask(d)
        self.metrics.published.labels(api).inc(count)
        self.metrics.publish_seconds.observe(time.monotonic() - start)
        return result

    async def command(self, body: dict[str, Any]) -> bytes:
        """A node command (pushd.web.control) carried out on every node:
        `{"nodes": n}`, the nodes that did (errors: `ask`)."""
        nodes = await ask(self.broker.control(body))
        return dump_json({"nodes": nodes})


class Collection(Resource):
    """`/<collection>/{name}...`: `child` makes the resource that a name (and the
    path after it) asks for, per request; the collection itself, and a path
    `child` does not know (None), are 404."""

    def __init__(self, producing: Producing) -> None:
        Resource.__init__(self)
        self._p = producing

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self.child(path.decode("utf-8", "replace"), request) or NotFound()

    def child(self, name: str, request: Request) -> Resource | None:
        raise NotImplementedError

    def render(self, request: Request) -> bytes:
        return NotFound().render(request)


class ChannelsResource(Collection):
    """`/channels/{channel}`, `/channels/{channel}/history` and
    `/channels/{channel}/presence`, made per request."""

    def child(self, name: str, request: Request) -> Resource | None:
        if not request.postpath:
            return ChannelResource(name, self._p)
        if request.postpath == [b"history"]:
            assert request.prepath is not None
            request.prepath.append(request.postpath.pop())
            return HistoryResource(name, self._p)
        if request.postpath == [b"presence"]:
            assert request.prepath is not None
            request.prepath.append(request.postpath.pop())
            return PresenceResource(name, self._p)
        return None


async def ask(d: Any, reading: bool = False) -> Any:
    """A broker's answer; 503 when it took nothing (a read: could not answer),
    504 when a publish may or may not be stored, 422 when its Idempotency-Key
    was used for another request."""
    try:
        return await d
    except BrokerUnavailable:
        raise ApiError(*(errors.READ_UNAVAILABLE if reading else errors.UNAVAILABLE)) from None
    except OutcomeUnknown:
        raise ApiError(*errors.OUTCOME_UNKNOWN) from None
    except IdempotencyKeyReused:
        raise ApiError(*errors.KEY_REUSED) from None


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

    def render(self, request: Request) -> Any:
        if request.method in (b"POST", b"OPTIONS"):
            allowed = self._p.browsers.cors(request)
            if request.method == b"OPTIONS":
                return self._p.browsers.preflight(request, allowed)
        return super().render(request)

    def handle_POST(self, request: Request) -> Coroutine[Any, Any, bytes]:
        """A producer's publish (an API key, or loopback when no key is configured),
        or a browser's: a subscriber token whose `publish` claim grants the channel."""
        auth = self._p.auth
        refusal = auth.refusal(
            request.getHeader(b"authorization"),
            lambda: request_host(request, auth.trusted_proxies),
            request.getHeader(b"x-forwarded-for"),
        )
        if refusal is not None:
            return self._browser_publish(request, refusal)
        # A page of a refused origin publishes nothing, whatever it holds (a key,
        # or loopback: a page in a browser on pushd's machine is a loopback client).
        self._p.browsers.check_origin(request)
        if not is_channel(self._channel):
            raise ApiError(*errors.BAD_CHANNEL)
        key = idempotency_key(request)
        data = message_data(request, self._p.config.max_message_size)
        return self._publish(data, key)

    async def _browser_publish(self, request: Request, refusal: tuple[int, str, str]) -> bytes:
        # The token first (its key may have to be fetched), then the body: the
        # same order of refusals as a producer's publish.
        token, grants = await self._p.browsers.admit(request, self._channel, refusal)
        key = idempotency_key(request)
        data = message_data(request, self._p.config.max_message_size)
        self._p.browsers.take(token, grants)
        if key is not None:
            key = self._p.browsers.scoped_key(key, token, grants)
        return await self._publish(data, key)

    async def _describe(self) -> bytes:
        last_id = await ask(self._broker.last_id(self._channel), reading=True)
        subscribers = await ask(self._broker.subscriber_count(self._channel), reading=True)
        return dump_json({"channel": self._channel, "last_id": last_id, "subscribers": subscribers})

    def handle_GET(self, request: Request) -> Coroutine[Any, Any, bytes]:
        self._checked(request)
        return self._describe()

    def handle_DELETE(self, request: Request) -> Coroutine[Any, Any, bytes]:
        """Every subscriber on every node leaves the channel; its history goes."""
        self._checked(request)
        return self._p.command({"cmd": "destroy", "channel": self._channel})


class HistoryResource(_ChannelApi):
    async def _read(self, since: str | None, limit: int) -> bytes:
        history = await ask(self._broker.history(self._channel, since, limit), reading=True)
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
            if (
                not (limit_text.isascii() and limit_text.isdigit())
                or not 1 <= int(limit_text) <= MAX_LIMIT
            ):
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
    body: bytes = request.content.read(max_size + 1)
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


RATE_LIMITED = (429, "rate_limited", "publishing too fast with this token (--publish-rate)")
NOT_GRANTED = (403, "forbidden", "the token does not grant publishing to this channel")
ORIGIN_REFUSED = (403, "forbidden", "origin not allowed (--allowed-origin)")


class BrowserPublish:
    """`POST /channels/{channel}` from a browser page (the contract's "register
    user events"): a subscriber token (`Authorization: Bearer`, or `?token=`
    for navigator.sendBeacon, which cannot set headers) whose `publish` claim
    grants the channel, checked as a subscription's token is; at most
    --publish-rate publishes a second per token (--publish-burst); from an
    allowed origin, with CORS: a preflight, and the headers on every answer."""

    METHODS = b"POST"
    HEADERS = b"Authorization, Content-Type, Idempotency-Key"
    MAX_AGE = b"600"  # seconds a browser may keep a preflight's answer

    def __init__(self, config: Config, clock: Any, verifier: TokenVerifier | None) -> None:
        self.verifier = verifier
        self.origins = OriginPolicy(config.allowed_origin)
        self.rates = KeyedBuckets(config.publish_rate, config.publish_burst, clock)

    def cors(self, request: Request) -> bool:
        """Sets the CORS headers of an answer to an allowed origin; False for a
        refused one. A request without Origin is not from a page: allowed, no headers."""
        origin = request.getHeader(b"origin")
        if origin is None:
            return True
        request.setHeader(b"vary", b"Origin")
        if not self.origins.admits(origin.decode("latin-1")):
            return False
        request.setHeader(b"access-control-allow-origin", origin)
        return True

    def preflight(self, request: Request, allowed: bool) -> Any:
        """OPTIONS: 204 with what a page may send here; 403 for a refused origin."""
        if not allowed:
            return _error(request, ORIGIN_REFUSED)
        request.setResponseCode(204)
        request.setHeader(b"allow", b"DELETE, GET, OPTIONS, POST")
        if request.getHeader(b"origin") is not None:
            request.setHeader(b"access-control-allow-methods", self.METHODS)
            request.setHeader(b"access-control-allow-headers", self.HEADERS)
            request.setHeader(b"access-control-max-age", self.MAX_AGE)
        # Finished here: returning b"" would make twisted.web add a Content-Length,
        # which a 204 must not carry (RFC 9110 8.6).
        request.write(b"")
        request.finish()
        return NOT_DONE_YET

    async def admit(
        self, request: Request, channel: str, refusal: tuple[int, str, str]
    ) -> tuple[str, Grants]:
        """The token and grants of a browser that may publish to `channel`; ApiError
        otherwise (`refusal`, the producer API's own, when no token is presented).
        Finishes at once unless the token's key must be fetched (a JWKS)."""
        authorization = request.getHeader(b"authorization")
        presented = token_from(
            query_value(request, b"token"),
            None if authorization is None else authorization.decode("latin-1"),
        )
        # What is not shaped as a JWT (header.claims.signature) is a wrong API key.
        if presented is None or self.verifier is None or presented.count(".") != 2:
            if refusal is errors.UNAUTHORIZED:
                request.setHeader(b"www-authenticate", b'Bearer realm="pushd"')
            raise ApiError(*refusal)
        self.check_origin(request)
        try:
            verified = self.verifier.verify(presented)
            grants = await verified if isinstance(verified, Deferred) else verified
        except AuthError as e:
            request.setHeader(b"www-authenticate", b'Bearer realm="pushd", error="invalid_token"')
            raise ApiError(e.status, e.code, e.message) from None
        if not is_channel(channel):
            raise ApiError(*errors.BAD_CHANNEL)
        if not grants.may_publish(channel):
            raise ApiError(*NOT_GRANTED)
        return presented, grants

    def check_origin(self, request: Request) -> None:
        """403 for a request from a page of an origin not allowed."""
        origin = request.getHeader(b"origin")
        if not self.origins.admits(None if origin is None else origin.decode("latin-1")):
            raise ApiError(*ORIGIN_REFUSED)

    @staticmethod
    def scoped_key(key: str, token: str, grants: Grants) -> str:
        """A browser's Idempotency-Key, in a space of its own: its user's (the
        token's `sub`), or its token's. A page can neither take a key the backend
        will use nor learn (from a 422) that the backend used one. The NUL cannot
        be in a key sent over HTTP (printable only), so no scoped key is anyone's
        plain key."""
        who = grants.sub if grants.sub is not None else hashlib.sha256(token.encode()).hexdigest()
        return f"{key}\x00browser:{who}"

    def take(self, token: str, grants: Grants) -> None:
        """One publish of the token's rate, or 429."""
        if not self.rates.take(token, grants.expires):
            raise ApiError(*RATE_LIMITED)


def _error(request: Request, refusal: tuple[int, str, str]) -> bytes:
    status, code, message = refusal
    body = dump_json({"error": code, "message": message})
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


class PresenceResource(_ChannelApi):
    """`GET /channels/{channel}/presence`: the channel's members on every node,
    `{"channel":..,"count":..,"users":..,"clients":[member...]}` (at most
    --max-presence-list members listed; count and users exact). 404
    `presence_off` for a channel without presence."""

    def handle_GET(self, request: Request) -> Coroutine[Any, Any, bytes]:
        self._checked(request)
        presence = self._p.presence
        if presence is None or not presence.tracks(self._channel):
            raise ApiError(*errors.PRESENCE_OFF)
        return ask(presence.query(self._channel), reading=True)
