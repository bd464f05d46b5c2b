"""The base of pushd's HTTP resources: method dispatch, auth and JSON errors.

Handlers are `handle_<METHOD>(request)` methods returning bytes of JSON, or a
coroutine of them; raising ApiError answers the contract's error body. The
status of an error never depends on how far the handler got: a handler checks
everything before it changes anything.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from pushd.auth import client_host, is_loopback_host, loopback_via_proxy, untrusted_forward
from pushd.message import dump_json
from pushd.web import errors
from pushd.web.errors import ApiError, Refusal

log = Logger()


def request_host(request: Request, trusted_proxies: int) -> str:
    """The client's address of a request (see pushd.auth.client_host)."""
    forwarded = request.getHeader(b"x-forwarded-for")
    return client_host(
        request.getClientAddress(),
        forwarded.decode("latin-1") if forwarded else None,
        trusted_proxies,
    )


def bearer_matches(authorization: bytes | None, keys: list[bytes]) -> bool:
    """True when `Authorization: Bearer <key>` holds one of `keys`; every key is
    compared, in constant time, so the time taken tells nothing of which."""
    scheme, _, presented = (authorization or b"").partition(b" ")
    presented = presented.strip()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented, key)
    return ok and scheme.lower() == b"bearer"


class ProducerAuth:
    """API keys, compared in constant time; none configured means loopback only
    (unix sockets count as loopback: whoever may open the socket is local)."""

    def __init__(self, keys: tuple[str, ...], trusted_proxies: int = 0) -> None:
        self._keys = [k.encode() for k in keys]
        self.trusted_proxies = trusted_proxies

    @property
    def has_keys(self) -> bool:
        return bool(self._keys)

    def refusal(
        self, authorization: bytes | None, host: Callable[[], str], forwarded: bytes | None
    ) -> Refusal | None:
        """Why a producer may not ask (an error of pushd.web.errors), or None.
        `host()` is the client's address, `forwarded` its X-Forwarded-For."""
        if not self._keys:
            address = host()
            if not is_loopback_host(address):
                return errors.LOOPBACK_ONLY
            if forwarded:
                loopback_via_proxy(address, forwarded.decode("latin-1"), self.trusted_proxies)
            return None
        if forwarded and not self.trusted_proxies:
            untrusted_forward()
        return None if bearer_matches(authorization, self._keys) else errors.UNAUTHORIZED

    def check(self, request: Request) -> None:
        refusal = self.refusal(
            request.getHeader(b"authorization"),
            lambda: request_host(request, self.trusted_proxies),
            request.getHeader(b"x-forwarded-for"),
        )
        if refusal is not None:
            if refusal is errors.UNAUTHORIZED:
                request.setHeader(b"www-authenticate", b'Bearer realm="pushd"')
            raise ApiError(*refusal)


class ApiResource(Resource):
    isLeaf = True
    content_type = b"application/json"

    def __init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: Request) -> Any:
        method = request.method.decode("ascii", "replace")
        handler = getattr(self, f"handle_{method}", None)
        if handler is None:
            allowed = sorted(m[7:] for m in dir(self) if m.startswith("handle_"))
            request.setHeader(b"allow", ", ".join(allowed).encode())
            error = ApiError(405, "method_not_allowed", f"{method} is not allowed here")
            return self._answer(request, error.status, self.error_body(error))
        try:
            result = handler(request)
        except ApiError as e:
            return self._answer(request, e.status, self.error_body(e))
        if not isinstance(result, Coroutine):
            return self._answer(request, 200, result)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(body: bytes) -> None:
            if not gone:
                request.write(self._answer(request, 200, body))
                request.finish()

        def fail(failure: Failure) -> None:
            if gone:
                return
            error = failure.value
            if not isinstance(error, ApiError):
                log.failure("request {uri} failed", failure, uri=request.uri)
                error = ApiError(500, "internal", "internal error")
            request.write(self._answer(request, error.status, self.error_body(error)))
            request.finish()

        Deferred.fromCoroutine(result).addCallbacks(answer, fail)
        return NOT_DONE_YET

    def _answer(self, request: Request, status: int, body: bytes) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"content-length", b"%d" % len(body))
        return body

    def error_body(self, error: ApiError) -> bytes:
        """The contract's JSON error; a resource with another contract overrides it."""
        return dump_json({"error": error.code, "message": error.message})


class NotFound(ApiResource):
    def render(self, request: Request) -> bytes:
        error = ApiError(*errors.NOT_FOUND)
        return self._answer(request, error.status, self.error_body(error))
