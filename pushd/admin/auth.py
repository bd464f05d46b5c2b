"""Who may use the admin console: the login cookie, admin keys, CSRF.

The cookie `pushd_admin=<expiry>.<mac>`: `expiry` in whole seconds since
the epoch, `mac` the hex HMAC-SHA256 of `expiry` under a key derived from the
admin password (HMAC(password, b"pushd admin cookie v1")), so that every node
given the same password accepts every node's cookie, and changing the
password logs everyone out. With admin keys but no password, the key is
derived from the keys (sorted), which also log in.

CSRF: an action (POST, DELETE) authenticated by the cookie must carry
`X-Pushd-Admin: 1` (a page of another site can send that only with CORS,
which /admin never grants), and an `Origin`, when there is one, naming the
request's own Host; else 403. Login and logout obey the same rule. A request
with an admin key (Authorization: Bearer) is not a browser's: no CSRF check.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any
from urllib.parse import urlsplit

from twisted.web.server import Request

from pushd.limits import KeyedBuckets
from pushd.web.errors import ApiError
from pushd.web.resource import request_host

COOKIE = b"pushd_admin"
#: Seconds a login lasts.
MAX_AGE = 43200
#: Login attempts per client address: LOGIN_BURST at once, then one every
#: 1/LOGIN_RATE seconds (5 in 10 s).
LOGIN_BURST = 5
LOGIN_RATE = 0.5

UNAUTHORIZED = (
    401,
    "unauthorized",
    "log in (POST /admin/api/login) or present an admin key (Authorization: Bearer)",
)
WRONG_PASSWORD = (401, "unauthorized", "wrong password")
RATE_LIMITED = (429, "rate_limited", "too many login attempts from this address; wait a moment")
NO_HEADER = (403, "forbidden", "an admin action needs the header X-Pushd-Admin: 1")
FOREIGN_ORIGIN = (403, "forbidden", "an admin action from another origin is refused")


def _derive(secret: str) -> bytes:
    return hmac.new(secret.encode(), b"pushd admin cookie v1", hashlib.sha256).digest()


def _default_port(netloc: str, scheme: str) -> str:
    default = {"http": ":80", "https": ":443"}.get(scheme, "")
    return netloc[: -len(default)] if default and netloc.endswith(default) else netloc


class AdminAuth:
    """The admin password and keys; `clock` (IReactorTime) dates cookies."""

    def __init__(
        self,
        password: str | None,
        keys: tuple[str, ...],
        clock: Any,
        trusted_proxies: int = 0,
    ) -> None:
        self._password = password.encode() if password is not None else None
        self._keys = [k.encode() for k in keys]
        self._mac_key = _derive(password if password is not None else "\0".join(sorted(keys)))
        self._clock = clock
        self._trusted_proxies = trusted_proxies
        self._attempts = KeyedBuckets(LOGIN_RATE, LOGIN_BURST, clock)

    # -- secrets, compared in constant time

    def _is_key(self, presented: bytes) -> bool:
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(presented, key)
        return ok

    def password_ok(self, presented: str) -> bool:
        """The admin password (or an admin key)."""
        given = presented.encode("utf-8", "surrogatepass")
        ok = self._password is not None and hmac.compare_digest(given, self._password)
        return self._is_key(given) | ok

    # -- the cookie

    def _mac(self, expiry: bytes) -> bytes:
        return hmac.new(self._mac_key, expiry, hashlib.sha256).hexdigest().encode()

    def make_cookie(self) -> bytes:
        """A fresh login's cookie value, valid MAX_AGE seconds."""
        expiry = b"%d" % (int(self._clock.seconds()) + MAX_AGE)
        return expiry + b"." + self._mac(expiry)

    def cookie_ok(self, value: bytes) -> bool:
        """Signed by this password's key, and not expired."""
        expiry, dot, mac = value.partition(b".")
        if not dot or not expiry.isdigit() or len(expiry) > 12:
            return False
        if not hmac.compare_digest(mac, self._mac(expiry)):
            return False
        return bool(int(expiry) > self._clock.seconds())

    def set_cookie(self, request: Request, value: bytes, max_age: int) -> None:
        secure = b"; Secure" if self._over_tls(request) else b""
        request.setHeader(
            b"set-cookie",
            COOKIE
            + b"="
            + value
            + b"; HttpOnly; SameSite=Strict; Path=/admin; Max-Age=%d" % max_age
            + secure,
        )

    def _over_tls(self, request: Request) -> bool:
        """Over TLS, or behind --trusted-proxies that say they took TLS
        (`X-Forwarded-Proto: https`, as the nginx example sets it)."""
        if request.isSecure():
            return True
        proto = request.getHeader(b"x-forwarded-proto")
        return bool(self._trusted_proxies and proto and proto.strip().lower() == b"https")

    # -- requests

    def how(self, request: Request) -> str | None:
        """How the request is authenticated: "key" (an admin key as Bearer),
        "cookie" (a valid login), or None."""
        authorization = request.getHeader(b"authorization")
        if authorization is not None:
            scheme, _, presented = authorization.partition(b" ")
            if scheme.lower() == b"bearer" and self._is_key(presented.strip()):
                return "key"
        cookie = request.getCookie(COOKIE)
        if cookie is not None and self.cookie_ok(cookie):
            return "cookie"
        return None

    def check(self, request: Request) -> str:
        """How the request is authenticated; ApiError 401 when it is not."""
        how = self.how(request)
        if how is None:
            raise ApiError(*UNAUTHORIZED)
        return how

    @staticmethod
    def check_csrf(request: Request) -> None:
        """A browser's action: X-Pushd-Admin: 1, and a same-origin Origin (if any)."""
        if request.getHeader(b"x-pushd-admin") != b"1":
            raise ApiError(*NO_HEADER)
        origin = request.getHeader(b"origin")
        if origin is None:
            return
        parts = urlsplit(origin.decode("latin-1").strip().lower())
        host = (request.getHeader(b"host") or b"").decode("latin-1").strip().lower()
        if not parts.netloc or _default_port(parts.netloc, parts.scheme) != _default_port(
            host, parts.scheme
        ):
            raise ApiError(*FOREIGN_ORIGIN)

    def take_attempt(self, request: Request) -> None:
        """One login attempt of the client's address, or 429."""
        if not self._attempts.take(request_host(request, self._trusted_proxies)):
            request.setHeader(b"retry-after", b"%d" % int(1 / LOGIN_RATE))
            raise ApiError(*RATE_LIMITED)
