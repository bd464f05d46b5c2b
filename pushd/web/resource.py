"""The base of pushd's HTTP resources: method dispatch, auth and JSON errors.

Handlers are `handle_<METHOD>(request)` methods returning bytes of JSON, or a
coroutine of them; raising ApiError answers the contract's error body. The
status of an error never depends on how far the handler got: a handler checks
everything before it changes anything.
"""

from __future__ import annotations

import hmac
from collections.abc import Coroutine
from ipaddress import ip_address
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from pushd.web import errors
from pushd.web.errors import ApiError, write_error, write_json

log = Logger()


def is_loopback(request: Request) -> bool:
    peer = request.getClientAddress()
    if isinstance(peer, IPv4Address | IPv6Address):
        return ip_address(peer.host.split("%", 1)[0]).is_loopback
    # Unix sockets: whoever may open the socket is local.
    return True


class ProducerAuth:
    """API keys, compared in constant time; none configured means loopback only."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = [k.encode() for k in keys]

    def check(self, request: Request) -> None:
        if not self._keys:
            if not is_loopback(request):
                raise ApiError(*errors.LOOPBACK_ONLY)
            return
        header = request.getHeader(b"authorization") or b""
        scheme, _, presented = header.partition(b" ")
        presented = presented.strip()
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(presented, key)
        if scheme.lower() != b"bearer" or not ok:
            request.setHeader(b"www-authenticate", b'Bearer realm="pushd"')
            raise ApiError(*errors.UNAUTHORIZED)


class ApiResource(Resource):
    isLeaf = True

    def render(self, request: Request) -> Any:
        method = request.method.decode("ascii", "replace")
        handler = getattr(self, f"handle_{method}", None)
        if handler is None:
            allowed = sorted(m[7:] for m in dir(self) if m.startswith("handle_"))
            request.setHeader(b"allow", ", ".join(allowed).encode())
            return _error_body(
                request, ApiError(405, "method_not_allowed", f"{method} is not allowed here")
            )
        try:
            result = handler(request)
        except ApiError as e:
            return _error_body(request, e)
        if not isinstance(result, Coroutine):
            request.setHeader(b"content-type", b"application/json")
            return result
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(body: bytes) -> None:
            if not gone:
                write_json(request, 200, body)

        def fail(failure: Failure) -> None:
            if gone:
                return
            if failure.check(ApiError):
                e: ApiError = failure.value  # type: ignore[assignment]
                write_error(request, e.status, e.code, e.message)
            else:
                log.failure("request {uri} failed", failure, uri=request.uri)
                write_error(request, 500, "internal", "internal error")

        Deferred.fromCoroutine(result).addCallbacks(answer, fail)
        return NOT_DONE_YET


def _error_body(request: Request, e: ApiError) -> bytes:
    request.setResponseCode(e.status)
    request.setHeader(b"content-type", b"application/json")
    from pushd.message import dump_json

    return dump_json({"error": e.code, "message": e.message})


class NotFound(ApiResource):
    def render(self, request: Request) -> bytes:
        return _error_body(request, ApiError(*errors.NOT_FOUND))
