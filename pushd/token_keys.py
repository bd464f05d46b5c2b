"""The public keys of RS256 and ES256 subscriber tokens: a PEM file
(`--token-public-key`) or a JWKS URL (`--token-jwks-url`).

A key's algorithm follows from the key, never from the token: an RSA key
verifies RS256 only, an EC key on P-256 ES256 only, so a token cannot choose
a weaker algorithm (`none`, or HS256 with the public key as its secret).
"""

from __future__ import annotations

import base64
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jwt import PyJWK, PyJWKClient
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pushd.config import split_credentials

log = Logger()

#: The algorithms of public keys pushd accepts, whichever way the keys come.
ACCEPTED = ("RS256", "ES256")


@dataclass(frozen=True)
class PublicKey:
    #: A cryptography public key object (RSAPublicKey or EllipticCurvePublicKey).
    key: Any
    #: "RS256" or "ES256", from the key's type.
    algorithm: str


def public_key_from_pem(data: bytes) -> PublicKey:
    """The key of a PEM `PUBLIC KEY` block and its algorithm; ValueError (one
    line) for what is not a PEM public key, or a key of another type or curve."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"not a PEM public key ({first})") from None
    if isinstance(key, rsa.RSAPublicKey):
        return PublicKey(key, "RS256")
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"an EC key must be on P-256 (ES256), not {key.curve.name}")
        return PublicKey(key, "ES256")
    raise ValueError(f"a {type(key).__name__} is neither RSA (RS256) nor EC P-256 (ES256)")


def read_public_key(path: str) -> PublicKey:
    """The key of a PEM file (see public_key_from_pem); ValueError (one line)
    when the file cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    return public_key_from_pem(data)


class KeyUnavailable(Exception):
    """The JWKS could not be fetched and no key is known: the reason, one line."""


class UnknownKey(Exception):
    """The JWKS has no usable key of this `kid` (after a refresh, or while refreshes wait)."""


class JwksKeys:
    """The signing keys of a JWKS URL, by `kid`.

    PyJWT's PyJWKClient fetches and parses the set, in a thread of the reactor's
    pool (urllib blocks); the cache and the refresh policy live here, on the
    reactor thread, so a known `kid` costs no thread hop and the bound on
    fetches does not depend on PyJWT's version:

    - the keys are fetched once the reactor runs (`start`), then again when used
      `lifespan` seconds after the last fetch (in the background: the old keys
      serve meanwhile, and stay when the fetch fails);
    - an unknown `kid` fetches the set again, unless a fetch started less than
      `refresh_interval` seconds ago: then it is refused without one, so tokens
      with made-up `kid`s cost at most one fetch per `refresh_interval`;
    - fetches never overlap: whoever needs one while one runs waits for it.
    """

    def __init__(
        self,
        url: str,
        reactor: Any = None,
        *,
        clock: Any = None,
        lifespan: float = 300.0,
        refresh_interval: float = 30.0,
        timeout: float = 10.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        # Credentials in the URL go as Basic auth, and never into a log line
        # or an answer: `url` is without them.
        url, credentials = split_credentials(url)
        headers = None
        if credentials is not None:
            token = base64.b64encode(":".join(credentials).encode()).decode()
            headers = {"Authorization": f"Basic {token}"}
        self.url = url
        self._timeout = timeout
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._lifespan = lifespan
        self._refresh_interval = refresh_interval
        # PyJWKClient's own set cache is off: this class decides when to fetch.
        self._client = PyJWKClient(url, cache_jwk_set=False, timeout=timeout, headers=headers)
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at: float | None = None
        self._attempted_at = -math.inf
        self._waiting: list[Deferred[None]] | None = None
        #: Fetches started (successful or not), for tests and metrics.
        self.fetches = 0
        self._failing = False

    @property
    def waiters(self) -> int:
        """Callers waiting for the fetch under way (0: none under way)."""
        return 0 if self._waiting is None else len(self._waiting)

    def start(self) -> None:
        """Fetch the keys now (errors are logged), so the first clients need not wait."""
        self._fetch().addErrback(lambda _: None)

    def key(self, kid: str) -> PyJWK | Deferred[PyJWK]:
        """The key of `kid`, or a Deferred of it when the keys must be fetched first.
        Raises (or fails with) UnknownKey, or KeyUnavailable when no key was ever
        fetched and fetching fails."""
        now = self._clock.seconds()
        if self._fetched_at is None:
            if now - self._attempted_at < self._refresh_interval and self._waiting is None:
                raise KeyUnavailable(f"the keys of {self.url} could not be fetched")
            return self._fetch().addCallback(lambda _: self._known(kid))
        if now - self._fetched_at >= self._lifespan and self._waiting is None:
            self._fetch().addErrback(lambda _: None)
        if kid in self._keys:
            return self._keys[kid]
        if self._waiting is not None:
            return self._after_fetch().addCallback(lambda _: self._known(kid))
        if now - self._attempted_at < self._refresh_interval:
            raise UnknownKey(kid)
        return self._fetch().addBoth(lambda _: self._known(kid))

    def _known(self, kid: str) -> PyJWK:
        key = self._keys.get(kid)
        if key is None:
            if self._fetched_at is None:
                raise KeyUnavailable(f"the keys of {self.url} could not be fetched")
            raise UnknownKey(kid)
        return key

    def _after_fetch(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        assert self._waiting is not None
        self._waiting.append(d)
        return d

    def _fetch(self) -> Deferred[None]:
        """Fetch the set (or join the fetch under way); fails with KeyUnavailable."""
        if self._waiting is not None:
            return self._after_fetch()
        self._waiting = []
        self._attempted_at = self._clock.seconds()
        self.fetches += 1
        done = self._after_fetch()
        fetching = _in_daemon_thread(self._reactor, self._client.get_signing_keys)
        # `timeout` bounds each read of urllib's, not the fetch: a server that
        # trickles bytes would hold every token client. The thread may go on;
        # its answer, late, is dropped.
        fetching.addTimeout(self._timeout, self._reactor)
        fetching.addCallbacks(self._fetched, self._failed)
        return done

    def _fetched(self, keys: list[PyJWK]) -> None:
        self._keys = {k.key_id: k for k in keys if k.key_id is not None}
        self._fetched_at = self._clock.seconds()
        if self._failing:
            log.info("JWKS {url} fetched again", url=self.url)
        self._failing = False
        self._settle(lambda d: d.callback(None))

    def _failed(self, failure: Any) -> None:
        first = str(failure.value).splitlines()[0] if str(failure.value) else ""
        why = f"{type(failure.value).__name__}: {first}" if first else type(failure.value).__name__
        if not self._failing:
            held = "keeping the keys fetched before" if self._keys else "no key known yet"
            log.warn(
                "JWKS {url} cannot be fetched ({why}); {held}", url=self.url, why=why, held=held
            )
        self._failing = True
        error = KeyUnavailable(f"the keys of {self.url} could not be fetched ({why})")
        self._settle(lambda d: d.errback(error))

    def _settle(self, fire: Callable[[Deferred[None]], None]) -> None:
        waiting, self._waiting = self._waiting or [], None
        for d in waiting:
            fire(d)


def _in_daemon_thread(reactor: Any, work: Callable[[], list[PyJWK]]) -> Deferred[list[PyJWK]]:
    """`work()` in a thread of its own, off the reactor's: a key server that
    trickles its answer holds that thread, which must hold neither the
    reactor's pool nor a stop (the reactor joins its pool's threads as it
    stops; a daemon thread it leaves behind)."""
    d: Deferred[list[PyJWK]] = Deferred()

    def settle(outcome: list[PyJWK] | Failure) -> None:
        if d.called:
            return  # timed out meanwhile: too late
        if isinstance(outcome, Failure):
            d.errback(outcome)
        else:
            d.callback(outcome)

    def run() -> None:
        outcome: list[PyJWK] | Failure
        try:
            outcome = work()
        except BaseException:
            outcome = Failure()
        reactor.callFromThread(settle, outcome)

    threading.Thread(target=run, name="pushd-jwks", daemon=True).start()
    return d
