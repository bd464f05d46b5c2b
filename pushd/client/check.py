"""`pushd-check`: a post-install self-check of a running pushd.

    pushd-check URL [--api-key K] [--token T] [--channel C] [--timeout S]
    python -m pushd.client.check URL ...

URL is pushd's base URL as clients reach it (`http://127.0.0.1:8080`, or
`https://push.example.com/prefix` behind a proxy). The check subscribes to one
channel over the WebSocket (`ws://` or `wss://` derived from URL, `/ws`) and over
Server-Sent Events (`/sse`), waits for both `subscribed`, publishes one unique
message through the producer API (`POST /channels/{channel}`) and waits until
it arrives on both. It prints one line per step and each transport's round-trip
time (publish sent -> message received), and exits 0 when both arrived; 1 with
one line `pushd-check: FAILED: <reason>` on stderr otherwise (connection
refused, 401/403 from the producer API or a handshake, a timeout, an HTTP
error with the server's JSON message); 2 for a bad command line.

The key and token default to $PUSHD_CHECK_API_KEY and $PUSHD_CHECK_TOKEN, which
keeps them out of `ps`. The default channel is `pushd-check.<random>`: the one
message stays in that channel's history until --history-ttl expires it.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
import time
import traceback
import uuid
from collections.abc import Coroutine
from typing import Any, TextIO, TypeVar
from urllib.parse import urlencode

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure

from pushd import __version__
from pushd.client.console import (
    Target,
    channel_arg,
    connect_reason,
    parse_command,
    run_command,
    secret_option,
    target_arg,
    verbose_log,
)
from pushd.client.sse import Event, EventStreamReceiver
from pushd.client.subscriber import hang_up

T = TypeVar("T")

USER_AGENT = f"pushd-check/{__version__}"
# Seconds the goodbyes (WebSocket close, stream hang-up) may take at the end.
CLOSE_TIMEOUT = 2.0

# What a refusal most likely means, by status and step.
_PUBLISH_HINTS = {
    401: "check --api-key",
    403: "the server has no --api-key, so only loopback clients may publish",
    404: "is URL pushd's base URL?",
    503: "the broker (Redis) is unavailable",
}
_HANDSHAKE_HINTS = {
    401: "check --token",
    403: "the Origin is not allowed, or --auth-url refused",
    404: "is URL pushd's base URL?",
    429: "too many connections from this address",
}


class CheckFailed(Exception):
    """The one-line reason the check failed."""


class StepTimeout(CheckFailed):
    """A step took longer than it may."""


class Arrival:
    """What one transport has seen: fires `subscribed`, then `arrived` (or fails)."""

    def __init__(self, name: str, channel: str, check: str) -> None:
        self.name = name
        self.channel = channel
        self.check = check
        self.subscribed: Deferred[None] = Deferred()
        self.arrived: Deferred[None] = Deferred()
        self.at: float | None = None  # time.perf_counter() of the message's arrival
        self.id: str | None = None  # the id it arrived with

    def on_subscribed(self, channel: Any) -> None:
        if channel == self.channel and not self.subscribed.called:
            self.subscribed.callback(None)

    def on_envelope(self, envelope: Any, now: float) -> None:
        if not (isinstance(envelope, dict) and envelope.get("type") == "message"):
            return
        data = envelope.get("data")
        if envelope.get("channel") != self.channel or not isinstance(data, dict):
            return
        if data.get("check") == self.check and self.at is None:
            self.at, self.id = now, envelope.get("id")
            if not self.arrived.called:
                self.arrived.callback(None)

    def fail(self, reason: str) -> None:
        """Fail whichever wait is pending (both, before the subscription)."""
        for d in (self.subscribed, self.arrived):
            if not d.called:
                d.errback(CheckFailed(f"{self.name}: {reason}"))

    def quiet(self) -> None:
        """The check is over: failures nobody waits for any more are not errors."""
        for d in (self.subscribed, self.arrived):
            d.addErrback(lambda _: None)


class _WSClient(WebSocketClientProtocol):
    factory: _WSFactory

    def __init__(self) -> None:
        super().__init__()
        self.closed: Deferred[None] = Deferred()

    @property
    def arrival(self) -> Arrival:
        return self.factory.arrival

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        now = time.perf_counter()
        try:
            frame = json.loads(payload)
        except ValueError:
            self.arrival.fail(f"a frame that is not JSON: {payload[:100]!r}")
            return
        kind = frame.get("type") if isinstance(frame, dict) else None
        if kind == "subscribed":
            self.arrival.on_subscribed(frame.get("channel"))
        elif kind == "message":
            self.arrival.on_envelope(frame, now)
        elif kind == "error" and frame.get("channel") in (None, self.arrival.channel):
            code = frame.get("code")
            hint = f" -- does --token grant {self.arrival.channel}?" if code == "forbidden" else ""
            self.arrival.fail(f"error {code}: {frame.get('message')}{hint}")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        failed = self.wasNotCleanReason
        refused = re.match(r"WebSocket connection upgrade failed \[(\d+)\]: ?(.*)", failed or "")
        if not self.arrival.subscribed.called and refused:
            status = int(refused.group(1))
            hint = _HANDSHAKE_HINTS.get(status)
            self.arrival.fail(
                f"handshake refused: {status} {refused.group(2)}".rstrip()
                + (f" -- {hint}" if hint else "")
            )
        elif failed and not self.arrival.subscribed.called:
            tls = re.fullmatch(r"SSL error: (.*?)(?: \(in .*\))?", failed)
            self.arrival.fail(
                f"TLS failed: {tls.group(1)}" if tls else f"handshake failed: {failed}"
            )
        else:
            self.arrival.fail(f"closed by the server: {code} {reason or ''}".rstrip())
        if not self.closed.called:
            self.closed.callback(None)


class _WSFactory(WebSocketClientFactory):
    protocol = _WSClient  # type: ignore[assignment]

    def __init__(self, arrival: Arrival, url: str, reactor: Any) -> None:
        WebSocketClientFactory.__init__(self, url, useragent=USER_AGENT, reactor=reactor)
        self.arrival = arrival
        # Autobahn's own handshake timer is coarse (batched); each step has --timeout.
        WebSocketClientFactory.setProtocolOptions(
            self, openHandshakeTimeout=0, closeHandshakeTimeout=CLOSE_TIMEOUT
        )


class _SSEReader(EventStreamReceiver):
    """The SSE side of the check: `subscribed`, then the message, timed on arrival."""

    def __init__(self, arrival: Arrival) -> None:
        super().__init__()
        self.arrival = arrival
        self._now = 0.0  # time.perf_counter() of the data being read

    def dataReceived(self, data: bytes) -> None:
        self._now = time.perf_counter()
        super().dataReceived(data)

    def eventReceived(self, event: Event) -> None:
        try:
            body = json.loads(event.data)
        except ValueError:
            return
        if event.type == "subscribed" and isinstance(body, dict):
            self.arrival.on_subscribed(body.get("channel"))
        elif event.type == "message":
            self.arrival.on_envelope(body, self._now)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.arrival.fail("the stream ended before the message arrived")
        super().connectionLost(reason)


async def _within(
    reactor: Any, seconds: float, what: str, work: Deferred[T] | Coroutine[Any, Any, T]
) -> T:
    """`work`'s result, or StepTimeout after `seconds` (and `work` cancelled)."""
    d = work if isinstance(work, Deferred) else Deferred.fromCoroutine(work)
    d.addTimeout(seconds, reactor)
    try:
        return await d
    except (defer.TimeoutError, error.TimeoutError):
        raise StepTimeout(f"{what}: timed out after {seconds:g} s") from None


async def _http_error(step: str, response: Any, hints: dict[int, str]) -> CheckFailed:
    """A refusal from pushd: its status, the JSON error's code and message, a hint."""
    text = (await response.content()).decode("utf-8", "replace").strip()
    try:
        body = json.loads(text)
        detail = f"{body['error']}: {body['message']}"
    except (ValueError, TypeError, KeyError):
        detail = response.phrase.decode("latin-1", "replace")
        if text:
            detail += f": {' '.join(text.split())[:120]}"
    hint = hints.get(response.code)
    return CheckFailed(f"{step}: {response.code} {detail}" + (f" -- {hint}" if hint else ""))


def _all(waits: list[Deferred[None]]) -> Deferred[None]:
    """Fires when every wait has, fails with the first failure; cancelling it (a
    timeout) leaves the waits alone, so the caller can still see which came."""
    done: Deferred[None] = Deferred()
    left = len(waits)

    def arrived(_: object) -> None:
        nonlocal left
        left -= 1
        if left == 0 and not done.called:
            done.callback(None)

    def failed(failure: Failure) -> None:
        if not done.called:
            done.errback(failure)

    for d in waits:
        d.addCallbacks(arrived, failed)
    return done


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


class Check:
    def __init__(self, reactor: Any, args: argparse.Namespace, out: TextIO) -> None:
        self.reactor = reactor
        self.target: Target = args.url
        self.api_key: str | None = args.api_key
        self.token: str | None = args.token
        self.channel: str = args.channel or f"pushd-check.{secrets.token_hex(6)}"
        self.timeout: float = args.timeout
        self.check = str(uuid.uuid4())
        self.out = out
        self.ws = Arrival("websocket", self.channel, self.check)
        self.sse = Arrival("sse", self.channel, self.check)
        self._ws_client: _WSClient | None = None
        self._sse_reader: _SSEReader | None = None
        self._sse_request: Deferred[Any] | None = None

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def _query(self) -> str:
        params = [("channel", self.channel)]
        if self.token:
            params.append(("token", self.token))
        return urlencode(params)

    async def _guard(self, step: str, work: Coroutine[Any, Any, T]) -> T:
        """Run one step within --timeout; connection failures become a CheckFailed."""
        try:
            return await _within(self.reactor, self.timeout, step, work)
        except CheckFailed:
            raise
        except Exception as exc:
            reason = connect_reason(exc, self.target)
            if reason is None:
                raise CheckFailed(f"{step}: {type(exc).__name__}: {exc}") from exc
            raise CheckFailed(f"{step}: {reason}") from None

    async def run(self) -> tuple[float, float]:
        """The check; each transport's round trip in seconds, or CheckFailed."""
        self.say(f"pushd-check {__version__}: {self.target.base}, channel {self.channel}")
        started = time.perf_counter()
        await self._guard("websocket", self._subscribe_ws())
        self.say(
            f"websocket: subscribed ({self.target.ws_url('channel=...')}) "
            f"in {_ms(time.perf_counter() - started)}"
        )
        started = time.perf_counter()
        await self._guard("sse", self._subscribe_sse())
        self.say(
            f"sse: subscribed ({self.target.sse_url('channel=...')}) "
            f"in {_ms(time.perf_counter() - started)}"
        )
        sent = time.perf_counter()
        msg_id = await self._guard("publish", self._publish())
        self.say(f"publish: accepted as {msg_id} in {_ms(time.perf_counter() - sent)}")

        try:
            await _within(
                self.reactor, self.timeout, "waiting", _all([self.ws.arrived, self.sse.arrived])
            )
        except StepTimeout:
            missing = " and ".join(a.name for a in (self.ws, self.sse) if a.at is None)
            raise CheckFailed(
                f"timed out after {self.timeout:g} s waiting for the message over {missing}"
            ) from None
        rtt = []
        for arrival in (self.ws, self.sse):
            assert arrival.at is not None
            if arrival.id != msg_id:
                raise CheckFailed(
                    f"{arrival.name}: the message arrived as {arrival.id!r}, published as {msg_id}"
                )
            rtt.append(arrival.at - sent)
            self.say(f"{arrival.name}: received, round trip {_ms(arrival.at - sent)}")
        return rtt[0], rtt[1]

    async def _subscribe_ws(self) -> None:
        url = self.target.ws_url(self._query())
        factory = _WSFactory(self.ws, url, self.reactor)
        endpoint: Any = HostnameEndpoint(
            self.reactor, self.target.host, self.target.port, timeout=self.timeout
        )
        if self.target.secure:
            endpoint = wrapClientTLS(optionsForClientTLS(self.target.host), endpoint)
        self._ws_client = await endpoint.connect(factory)
        await self.ws.subscribed

    async def _subscribe_sse(self) -> None:
        headers: dict[bytes | str, list[bytes | str]] = {
            "Accept": ["text/event-stream"],
            "User-Agent": [USER_AGENT],
        }
        self._sse_request = treq.get(
            self.target.sse_url(self._query()),
            headers=headers,
            unbuffered=True,
            persistent=False,
            reactor=self.reactor,
        )
        response = await self._sse_request
        if response.code != 200:
            raise await _http_error("sse", response, _HANDSHAKE_HINTS)
        self._sse_reader = _SSEReader(self.sse)
        response.deliverBody(self._sse_reader)
        await self.sse.subscribed

    async def _publish(self) -> str:
        headers: dict[bytes | str, list[bytes | str]] = {
            "Content-Type": ["application/json"],
            "User-Agent": [USER_AGENT],
        }
        if self.api_key:
            headers["Authorization"] = [f"Bearer {self.api_key}"]
        body = json.dumps({"check": self.check, "sent": time.time()}).encode()
        response = await treq.post(
            self.target.publish_url(self.channel),
            body,
            headers=headers,
            persistent=False,
            reactor=self.reactor,
        )
        if response.code != 200:
            raise await _http_error("publish", response, _PUBLISH_HINTS)
        try:
            return str((await response.json())["id"])
        except (ValueError, TypeError, KeyError):
            raise CheckFailed("publish: 200 without a message id: is URL pushd?") from None

    async def close(self) -> None:
        """Say goodbye on both transports, each within CLOSE_TIMEOUT, then hang up."""
        self.ws.quiet()
        self.sse.quiet()
        if self._sse_request is not None and not self._sse_request.called:
            self._sse_request.addErrback(lambda _: None)
            self._sse_request.cancel()
        if self._sse_reader is not None:
            self._sse_reader.hang_up()
            await self._bounded(self._sse_reader.ended)
        client = self._ws_client
        if client is not None:
            hang_up(client)
            if not await self._bounded(client.closed) and client.transport is not None:
                client.transport.abortConnection()

    async def _bounded(self, d: Deferred[None]) -> bool:
        try:
            await _within(self.reactor, CLOSE_TIMEOUT, "closing", d)
        except StepTimeout:
            return False
        return True


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number of seconds above 0")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pushd-check",
        description="Publish one message through a running pushd and confirm it arrives "
        "over WebSocket and Server-Sent Events.",
    )
    p.add_argument("url", type=target_arg, metavar="URL", help="pushd's base URL, http(s)://...")
    secret_option(p, "--api-key", "PUSHD_CHECK_API_KEY", "producer key")
    secret_option(p, "--token", "PUSHD_CHECK_TOKEN", "subscriber token granting the channel")
    p.add_argument(
        "--channel", type=channel_arg, help="channel to use (default: pushd-check.<random>)"
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        help="seconds each step may take (default: 10)",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="show Twisted's and Autobahn's log on stderr"
    )
    p.add_argument("--version", action="version", version=f"pushd-check {__version__}")
    return p


async def run(
    reactor: Any, argv: list[str], out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """The check as a function: 0 when both transports got the message, 1 when not,
    2 for a bad command line (or 0 for --help)."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = parse_command(parser(), argv)
    if isinstance(args, int):
        return args
    with verbose_log(args.verbose, err):
        return await _check(reactor, args, out, err)


async def _check(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    check = Check(reactor, args, out)
    try:
        ws_rtt, sse_rtt = await check.run()
    except CheckFailed as exc:
        print(f"pushd-check: FAILED: {exc}", file=err, flush=True)
        return 1
    except Exception as exc:  # a bug: still one line (and the traceback with -v)
        if args.verbose:
            traceback.print_exc(file=err)
        print(f"pushd-check: FAILED: {type(exc).__name__}: {exc}", file=err, flush=True)
        return 1
    finally:
        await check.close()
    print(f"pushd-check: OK (websocket {_ms(ws_rtt)}, sse {_ms(sse_rtt)})", file=out, flush=True)
    return 0


def main(argv: list[str] | None = None) -> None:
    """The `pushd-check` console script: exits with run()'s status."""
    run_command(run, argv)


if __name__ == "__main__":
    main()
