"""Who may subscribe and publish where: subscriber tokens, grants, origins.

A subscriber's rights are a Grants: its user id (`sub`), the channel patterns
it may subscribe to and those it may publish to (`*` matches any run of
characters). They come from a JWT (HS256 with `--token-secret`, RS256 or ES256
with `--token-public-key` or `--token-jwks-url`), from the
application's answer at connect (`--auth-url`, see pushd.auth_url), or, with
neither configured, from the anonymous default: subscribe to any channel that
is not a user channel, publish nowhere.

User channels (`name#alice,bob`) are decided by `sub` alone: only the listed
users may subscribe, whatever the channel patterns say.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from ipaddress import ip_address
from typing import Any

import jwt
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.logger import Logger

from pushd.config import Config, ConfigError
from pushd.message import dump_json
from pushd.refused import Refused
from pushd.token_keys import (
    ACCEPTED,
    JwksKeys,
    KeyUnavailable,
    PublicKey,
    UnknownKey,
    read_public_key,
)

log = Logger()


class AuthError(Refused):
    """A refused credential: HTTP `status` before upgrading, `code` in the body."""


@lru_cache(maxsize=1024)
def _pattern(glob: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in glob.split("*")))


def matches(patterns: Iterable[str], name: str) -> bool:
    return any(_pattern(p).fullmatch(name) is not None for p in patterns)


def user_ids(channel: str) -> tuple[str, ...] | None:
    """The users of a user channel (`dm#alice,bob` -> alice, bob); None otherwise."""
    _, sep, ids = channel.partition("#")
    return tuple(ids.split(",")) if sep else None


@dataclass(frozen=True, slots=True)
class Grants:
    sub: str | None = None
    channels: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    #: POSIX time after which the connection must end (token `exp`); None: never.
    expires: float | None = None
    #: The token's (or --auth-url answer's) `info`, as compact JSON: what a
    #: presence member shows of the client.
    info: bytes = b"null"

    def _admits(self, patterns: tuple[str, ...], channel: str) -> bool:
        users = user_ids(channel)
        if users is not None:
            return self.sub is not None and self.sub in users
        return matches(patterns, channel)

    def may_subscribe(self, channel: str) -> bool:
        return self._admits(self.channels, channel)

    def may_publish(self, channel: str) -> bool:
        users = user_ids(channel)
        if users is not None and (self.sub is None or self.sub not in users):
            return False
        return matches(self.publish, channel)

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any], expires: float | None = None) -> Grants:
        """Grants from token claims or an --auth-url answer; bad shapes are refused."""

        def names(key: str) -> tuple[str, ...]:
            value = claims.get(key, [])
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise AuthError(401, "bad_token", f"claim {key!r} must be a list of strings")
            return tuple(value)

        sub = claims.get("sub")
        if sub is not None and not isinstance(sub, str):
            raise AuthError(401, "bad_token", "claim 'sub' must be a string")
        info = b"null"
        if claims.get("info") is not None:
            try:
                info = dump_json(claims["info"])
            except (TypeError, ValueError):
                raise AuthError(401, "bad_token", "claim 'info' is not JSON") from None
            if len(info) > MAX_INFO:
                raise AuthError(401, "bad_token", f"claim 'info' is over {MAX_INFO} bytes of JSON")
        return cls(
            sub=sub,
            channels=names("channels"),
            publish=names("publish"),
            expires=expires,
            info=info,
        )


ANONYMOUS = Grants(channels=("*",))
#: Bytes of JSON a token's `info` may take: it is listed in presence answers.
MAX_INFO = 4096


class TokenVerifier:
    """Subscriber tokens (JWT); `exp` required, `aud` too with an audience.

    Each key pins its algorithm, so `alg: none` and every algorithm but the key's
    are refused: the secret verifies HS256, a PEM public key RS256 (RSA) or
    ES256 (EC P-256), a JWKS the RS256/ES256 key its `kid` names. A token with a
    `kid` goes to the JWKS when one is configured; else an HS256 token to the
    secret; else the public key file, else the secret.
    """

    def __init__(
        self,
        secret: str | None = None,
        audience: str | None = None,
        leeway: float = 0,
        *,
        public_key: PublicKey | None = None,
        jwks: JwksKeys | None = None,
    ) -> None:
        if secret is None and public_key is None and jwks is None:
            raise ValueError("a token verifier needs a secret, a public key or a JWKS")
        self._secret = secret
        self._audience = audience
        self._leeway = leeway
        self._public_key = public_key
        self._jwks = jwks

    @property
    def jwks(self) -> JwksKeys | None:
        """The keys of `--token-jwks-url`, when configured."""
        return self._jwks

    def verify(self, token: str) -> Grants | Deferred[Grants]:
        """The token's grants, or a Deferred of them while the JWKS is fetched;
        AuthError (raised, or the Deferred's failure) when refused: 401
        `token_expired`, 401 `bad_token`, 503 `auth_unavailable` (no JWKS key yet)."""
        if self._public_key is None and self._jwks is None:
            assert self._secret is not None
            return self._decode(token, self._secret, "HS256")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as e:
            raise AuthError(401, "bad_token", f"invalid token: {e}") from None
        kid = header.get("kid")
        if self._jwks is not None and kid is not None:
            if not isinstance(kid, str):
                raise AuthError(401, "bad_token", "invalid token: 'kid' must be a string")
            try:
                found = self._jwks.key(kid)
            except Exception as e:
                raise _key_refusal(e) from None
            if isinstance(found, Deferred):
                return found.addCallbacks(
                    lambda key: self._decode_jwk(token, key),
                    lambda failure: _raise(_key_refusal(failure.value)),
                )
            return self._decode_jwk(token, found)
        if header.get("alg") == "HS256" and self._secret is not None:
            return self._decode(token, self._secret, "HS256")
        if self._public_key is not None:
            return self._decode(token, self._public_key.key, self._public_key.algorithm)
        if self._secret is not None:
            return self._decode(token, self._secret, "HS256")
        raise AuthError(401, "bad_token", "invalid token: no 'kid' to find its key in the JWKS")

    def _decode_jwk(self, token: str, jwk: Any) -> Grants:
        if jwk.algorithm_name not in ACCEPTED:
            raise AuthError(
                401,
                "bad_token",
                f"invalid token: the key {jwk.key_id!r} is {jwk.algorithm_name}, "
                f"not one of {', '.join(ACCEPTED)}",
            )
        return self._decode(token, jwk.key, jwk.algorithm_name)

    def _decode(self, token: str, key: Any, algorithm: str) -> Grants:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                leeway=self._leeway,
                options={"require": ["exp"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token_expired", "the token has expired") from None
        except jwt.InvalidTokenError as e:
            raise AuthError(401, "bad_token", f"invalid token: {e}") from None
        return Grants.from_claims(claims, expires=float(claims["exp"]))


def _key_refusal(error: BaseException) -> BaseException:
    """The AuthError for a JWKS lookup that found no key; other errors as they are."""
    if isinstance(error, UnknownKey):
        return AuthError(401, "bad_token", f"invalid token: no key {error.args[0]!r} in the JWKS")
    if isinstance(error, KeyUnavailable):
        # The why is in pushd's log; a stranger learns nothing of the key server.
        return AuthError(503, "auth_unavailable", "the token keys are unavailable; retry later")
    return error


def _raise(error: BaseException) -> Any:
    raise error


def make_verifier(config: Config, reactor: Any = None) -> TokenVerifier | None:
    """The verifier of the token options (None: none is set); the JWKS's first
    fetch starts once `reactor` runs. ConfigError when the key file went bad
    since the options were read."""
    public_key = None
    if config.token_public_key is not None:
        try:
            public_key = read_public_key(config.token_public_key)
        except ValueError as e:
            raise ConfigError(f"--token-public-key: {e}") from None
    jwks = None
    if config.token_jwks_url is not None:
        if reactor is None:
            from twisted.internet import reactor
        jwks = JwksKeys(config.token_jwks_url, reactor)
        reactor.callWhenRunning(jwks.start)
    if config.token_secret is None and public_key is None and jwks is None:
        return None
    return TokenVerifier(
        config.token_secret, config.token_audience, public_key=public_key, jwks=jwks
    )


def token_from(query_token: str | None, authorization: str | None) -> str | None:
    """`?token=` or `Authorization: Bearer <token>`."""
    if query_token:
        return query_token
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None


class OriginPolicy:
    """`--allowed-origin` patterns; none configured admits any origin.

    A request without an Origin header is not from a browser page and is
    admitted: the policy protects users' browsers, not the server.
    """

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.patterns = patterns

    def admits(self, origin: str | None) -> bool:
        if not self.patterns or origin is None:
            return True
        return matches(self.patterns, origin)


class Authenticator:
    """The grants of a connecting client, from whichever source is configured:
    a token when one is presented (and a secret configured), else the
    application (`--auth-url`), else anonymous unless tokens are required."""

    def __init__(self, verifier: TokenVerifier | None = None, application: Any = None) -> None:
        #: The token verifier, shared with browser publishing (pushd.web.producer).
        self.verifier = verifier
        self._application = application

    def grants(self, token: str | None, **context: Any) -> Any:
        """Grants, or a Deferred of them (asking the application); AuthError when refused."""
        if token is not None and self.verifier is not None:
            return self.verifier.verify(token)
        if self._application is not None:
            return self._application.authorize(**context)
        if self.verifier is not None:
            raise AuthError(401, "token_required", "a token is required (?token= or Bearer)")
        return ANONYMOUS


class Gate:
    """Admission of a subscriber connection, the same for every transport:
    its origin, its address's share of connections, then its grants."""

    def __init__(
        self, authenticator: Authenticator, origins: OriginPolicy, connections: Any, metrics: Any
    ) -> None:
        self.authenticator = authenticator
        self.origins = origins
        self.connections = connections
        self._metrics = metrics

    def admit(
        self,
        *,
        transport: str,
        address: str,
        token: str | None,
        headers: Mapping[str, str],
        **context: Any,
    ) -> Deferred[Grants]:
        """Grants for an admitted client, which then holds one of its address's
        connections until `release`; fails with AuthError otherwise."""
        if not self.origins.admits(headers.get("origin")):
            return self._refuse(AuthError(403, "forbidden", "origin not allowed"))
        if not self.connections.acquire(address):
            return self._refuse(AuthError(429, "too_many_connections", "too many connections"))
        d = maybeDeferred(
            self.authenticator.grants,
            token,
            transport=transport,
            address=address,
            headers=headers,
            **context,
        )

        def admitted(grants: Grants) -> Grants:
            self._metrics.connections.labels(transport).inc()
            return grants

        def refused(failure: Any) -> Any:
            self.connections.release(address)
            if isinstance(failure.value, AuthError):
                self._metrics.refused.labels(failure.value.code).inc()
            return failure

        return d.addCallbacks(admitted, refused)

    def _refuse(self, error: AuthError) -> Deferred[Grants]:
        self._metrics.refused.labels(error.code).inc()
        return fail(error)

    def release(self, address: str, transport: str) -> None:
        """An admitted client has gone."""
        self.connections.release(address)
        self._metrics.connections.labels(transport).dec()


def client_host(peer: Any, forwarded_for: str | None, trusted_proxies: int) -> str:
    """The client's address: the connection's peer, or, behind `trusted_proxies`
    proxies that each append to X-Forwarded-For, the address the farthest of
    them saw (what a client writes into the header itself is never believed).
    A unix socket's peer is "local"."""
    host = getattr(peer, "host", None)
    if not isinstance(host, str):
        host = "local"
    if forwarded_for:
        if not trusted_proxies:
            untrusted_forward()
            return host
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        if hops:
            host = hops[-min(trusted_proxies, len(hops))]
    return host


class ProxyWarnings:
    """What pushd says, once per process, when a proxy seems misconfigured: each
    warning would otherwise repeat on every request. Tests reset `said`."""

    said: set[str] = set()

    @classmethod
    def once(cls, what: str, text: str, **fields: Any) -> None:
        if what not in cls.said:
            cls.said.add(what)
            log.warn(text, **fields)


def untrusted_forward() -> None:
    """A request carries X-Forwarded-For while --trusted-proxies is 0."""
    ProxyWarnings.once(
        "untrusted-forward",
        "requests carry X-Forwarded-For but --trusted-proxies is 0: every client looks "
        "like the proxy; set --trusted-proxies 1 behind one proxy",
    )


def loopback_via_proxy(host: str, forwarded_for: str, trusted_proxies: int) -> None:
    """A producer request that came through a proxy was admitted as a loopback
    client, with no --api-key: the proxy may be serving anyone."""
    if trusted_proxies:
        text = (
            "a producer request through a proxy was admitted as loopback ({host}, from "
            "X-Forwarded-For: {forwarded_for}) for want of --api-key: the proxies' header "
            "is all that vouches for it; set --api-key"
        )
    else:
        text = (
            "a producer request through a proxy (X-Forwarded-For: {forwarded_for}) was "
            "admitted as loopback for want of --api-key: the proxy connects from {host} and "
            "--trusted-proxies is 0, so through it ANYONE may publish; set --api-key "
            "(and --trusted-proxies 1)"
        )
    ProxyWarnings.once("loopback-via-proxy", text, host=host, forwarded_for=forwarded_for)


@lru_cache(maxsize=4096)
def is_loopback_host(host: str) -> bool:
    if host == "local":
        return True
    try:
        address = ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    # A dual-stack listener sees 127.0.0.1 as ::ffff:127.0.0.1.
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)
