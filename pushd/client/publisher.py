"""Publishing through pushd's producer API, with retries that never publish twice.

`Publisher` retries a publish that got 503 (Redis unavailable), 504 (outcome
unknown) or lost its connection, with exponential backoff and jitter, always
under one `Idempotency-Key` (made up when the caller gives none), so a retry
never publishes twice. Other refusals raise
`PushdError(status, code, message)` with the server's JSON error.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, cast

from treq.client import HTTPClient
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IAgent

from pushd import __version__
from pushd.client.console import Target

__all__ = ["Publisher", "PushdError"]

log = Logger()

USER_AGENT = f"pushd-client/{__version__}"

#: Failures of the connection (not answers of the server): a publish retries them.
_CONNECTION_ERRORS = (
    error.ConnectError,
    error.ConnectionLost,
    error.ConnectionDone,
    error.TimeoutError,
    defer.TimeoutError,
    ResponseNeverReceived,
    ResponseFailed,
    RequestTransmissionFailed,
)

#: Answers a publish retries, under the same Idempotency-Key: 503 (nothing was
#: stored) and 504 (it may have been: the retry answers the stored id, if any).
_RETRIED = frozenset((503, 504))

Headers = dict[bytes | str, list[bytes | str]]


class PushdError(Exception):
    """pushd refused a request: the HTTP status and the JSON error's code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter: between half and all of min(cap, base * 2**attempt)."""
    delay: float = min(cap, base * 2**attempt)
    return delay / 2 + random.uniform(0, delay / 2)


async def _error_of(response: Any) -> PushdError:
    text = (await response.content()).decode("utf-8", "replace").strip()
    try:
        body = json.loads(text)
        return PushdError(response.code, str(body["error"]), str(body["message"]))
    except (ValueError, TypeError, KeyError):
        phrase = response.phrase.decode("latin-1", "replace")
        return PushdError(response.code, "http_error", " ".join(text.split())[:200] or phrase)


class _Client:
    """What the Publisher and the Subscriber share: pushd's URL, a reactor (the
    global one when none is given) and the wait before another try, from
    `backoff` seconds, doubling each time up to `max_backoff`, with jitter."""

    def __init__(self, url: str, reactor: Any, backoff: float, max_backoff: float) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.target = Target.parse(url)
        self.reactor = reactor
        self.backoff = backoff
        self.max_backoff = max_backoff

    def _pause(self, attempt: int) -> Deferred[None]:
        """The wait after try number `attempt` (from 0)."""
        delay = _backoff(attempt, self.backoff, self.max_backoff)
        return deferLater(self.reactor, delay, lambda: None)


class Publisher(_Client):
    """Publishes through pushd's producer API (`POST /channels/{channel}`, `POST /publish`),
    and asks it who is in a channel (`presence()`).

    Every publish carries an `Idempotency-Key` (the caller's, or a random one):
    `retries` is how many times it is tried again, under that key, after a 503,
    a 504 or a lost connection, waiting `backoff` seconds (doubling each time,
    with jitter) between tries; `timeout` bounds each try. A 422 (the key was
    first used with another request) is raised, never retried.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        reactor: Any = None,
        retries: int = 5,
        backoff: float = 0.2,
        max_backoff: float = 10.0,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(url, reactor, backoff, max_backoff)
        self.api_key = api_key
        self.retries = retries
        self.timeout = timeout
        self._pool = HTTPConnectionPool(self.reactor, persistent=True)
        self._http = HTTPClient(cast(IAgent, Agent(self.reactor, pool=self._pool)))

    async def publish(self, channel: str, data: Any, *, idempotency_key: str | None = None) -> str:
        """Publish one message; its id. A `str` is sent as text, anything else as JSON."""
        if isinstance(data, str):
            body, ctype = data.encode("utf-8"), "text/plain; charset=utf-8"
        else:
            # Strict JSON (pushd refuses NaN and Infinity): ValueError here, not a 400.
            text = json.dumps(data, separators=(",", ":"), allow_nan=False)
            body, ctype = text.encode(), "application/json"
        answer = await self._post(
            self.target.publish_url(channel), body, ctype, idempotency_key or uuid.uuid4().hex
        )
        try:
            return str(answer["id"])
        except (TypeError, KeyError):
            raise PushdError(200, "bad_answer", f"no message id in {answer!r:.200}") from None

    async def publish_batch(
        self, items: Iterable[tuple[str, Any]], *, idempotency_key: str | None = None
    ) -> list[str]:
        """Publish many `(channel, data)` messages in one request (`POST /publish`,
        NDJSON), in order; their ids. Data is sent as JSON (a `str` stays a string)."""
        lines = [
            json.dumps({"channel": channel, "data": data}, separators=(",", ":"), allow_nan=False)
            for channel, data in items
        ]
        if not lines:
            return []
        body = ("\n".join(lines) + "\n").encode()
        answer = await self._post(
            f"{self.target.base}/publish",
            body,
            "application/x-ndjson",
            idempotency_key or uuid.uuid4().hex,
        )
        try:
            ids = [str(result["id"]) for result in answer["results"]]
        except (TypeError, KeyError):
            raise PushdError(200, "bad_answer", f"no results in {answer!r:.200}") from None
        if len(ids) != len(lines):
            raise PushdError(200, "bad_answer", f"{len(ids)} ids for {len(lines)} messages")
        return ids

    async def presence(self, channel: str) -> dict[str, Any]:
        """Who is in `channel` (a `--presence` channel): `GET /channels/{channel}/presence`,
        `{"channel", "count", "users", "clients": [{"client", "user", "info"}, ...]}`
        (`clients` capped by pushd's `--max-presence-list`). Retried as a publish is;
        `PushdError` 404 `presence_off` when the channel has no presence."""
        url = f"{self.target.publish_url(channel)}/presence"
        headers = self._headers()
        answer = await self._retrying("presence", lambda: self._read(url, headers))
        if not isinstance(answer, dict) or not isinstance(answer.get("clients"), list):
            raise PushdError(200, "bad_answer", f"no clients in {answer!r:.200}")
        return answer

    def _headers(self) -> Headers:
        headers: Headers = {"User-Agent": [USER_AGENT]}
        if self.api_key:
            headers["Authorization"] = [f"Bearer {self.api_key}"]
        return headers

    async def _post(self, url: str, body: bytes, ctype: str, key: str) -> Any:
        headers = self._headers()
        headers["Content-Type"] = [ctype]
        headers["Idempotency-Key"] = [key]
        return await self._retrying("publish", lambda: self._attempt(url, body, headers))

    async def _retrying(
        self, what: str, attempt_once: Callable[[], Coroutine[Any, Any, Any]]
    ) -> Any:
        attempt = 0
        while True:
            try:
                d = Deferred.fromCoroutine(attempt_once())
                return await d.addTimeout(self.timeout, self.reactor)
            except PushdError as exc:
                if exc.status not in _RETRIED or attempt >= self.retries:
                    raise
                log.info(
                    "{what}: {status} {message}, retrying",
                    what=what,
                    status=exc.status,
                    message=exc.message,
                )
            except _CONNECTION_ERRORS as exc:
                if attempt >= self.retries:
                    raise
                log.info("{what}: {error!r}, retrying", what=what, error=exc)
            await self._pause(attempt)
            attempt += 1

    async def _attempt(self, url: str, body: bytes, headers: Headers) -> Any:
        response = await self._http.post(url, data=body, headers=headers)
        if response.code != 200:
            raise await _error_of(response)
        return await response.json()

    async def _read(self, url: str, headers: Headers) -> Any:
        response = await self._http.get(url, headers=headers)
        if response.code != 200:
            raise await _error_of(response)
        return await response.json()

    def close(self) -> Deferred[None]:
        """Close the pooled connections (fires when they are closed)."""
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
