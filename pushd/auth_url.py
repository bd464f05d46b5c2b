"""Connect authorisation by the application (`--auth-url`).

For a client that brings no token, pushd POSTs what the browser sent — its
cookies, a few headers, the channels it asks for — to the application, which
answers with grants like a token's:

  -> POST <auth-url>  {"transport": "websocket", "address": "203.0.113.7",
                       "channels": ["news"], "cookies": {"session": "..."},
                       "headers": {"user-agent": "...", "origin": "..."}}
  <- 200 {"sub": "alice", "channels": ["news", "chat.*"], "publish": ["chat.*"]}

Anything else (a timeout, a connection error, a status other than 200, an
answer over 64 KiB or not a JSON object) refuses the client.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie
from typing import Any

import treq
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

from pushd.auth import AuthError, Grants
from pushd.config import split_credentials

log = Logger()

FORWARDED_HEADERS = (
    "authorization",
    "user-agent",
    "origin",
    "referer",
    "accept-language",
    "x-forwarded-for",
    "x-real-ip",
)
MAX_ANSWER = 65536

REFUSED = AuthError(403, "forbidden", "the application refused the connection")


def cookies_of(header: str | None) -> dict[str, str]:
    if not header:
        return {}
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return {}
    return {name: morsel.value for name, morsel in jar.items()}


class ConnectAuthorizer:
    def __init__(self, url: str, timeout: float, reactor: Any) -> None:
        # Credentials in the URL go as Basic auth; `url` is without them.
        self.url, self._credentials = split_credentials(url)
        self._timeout = timeout
        self._reactor = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 32

    def authorize(
        self,
        *,
        transport: str,
        address: str,
        channels: list[str],
        headers: Mapping[str, str],
    ) -> Deferred[Grants]:
        """Ask the application; fails with AuthError when it does not say yes."""
        body = {
            "transport": transport,
            "address": address,
            "channels": channels,
            "cookies": cookies_of(headers.get("cookie")),
            "headers": {k: headers[k] for k in FORWARDED_HEADERS if k in headers},
        }
        d = Deferred.fromCoroutine(self._ask(body))
        # treq's own timeout covers the response headers only, not the body.
        d.addTimeout(self._timeout, self._reactor)
        d.addErrback(self._refuse)
        return d

    async def _ask(self, body: dict[str, Any]) -> Grants:
        response = await treq.post(
            self.url,
            json=body,
            auth=self._credentials,
            pool=self._pool,
            reactor=self._reactor,
            timeout=self._timeout,
        )
        received = bytearray()

        def collect(data: bytes) -> None:
            received.extend(data)
            if len(received) > MAX_ANSWER:
                raise ValueError("answer too large")

        await treq.collect(response, collect)
        if response.code != 200:
            raise ValueError(f"status {response.code}")
        answer = json.loads(received)
        if not isinstance(answer, dict):
            raise ValueError("answer is not a JSON object")
        expires = answer.get("expires")
        if expires is not None and not isinstance(expires, int | float):
            raise ValueError("expires must be a number")
        return Grants.from_claims(answer, expires=expires)

    def _refuse(self, failure: Any) -> Grants:
        log.info(
            "--auth-url refused a client: {why}",
            why=failure.getErrorMessage() or failure.type.__name__,
        )
        raise REFUSED

    def close(self) -> Deferred[None]:
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed
