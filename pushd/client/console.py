"""What `pushd-cli` and `pushd-check` share: pushd's URL (`Target`, which the
Python client uses too), argparse types, the reason a connection failed in a few
words, and running a command on the reactor (`run_command`, with `-v` through
`verbose_log`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO, cast
from urllib.parse import quote, urlsplit

from twisted.internet import error
from twisted.internet.task import react
from twisted.logger import (
    ILogObserver,
    globalLogBeginner,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from pushd.message import is_channel


@dataclass(frozen=True)
class Target:
    """pushd's base URL, and the URLs of its endpoints the client side uses."""

    base: str  # scheme://host[:port][/prefix], no trailing slash
    host: str
    port: int
    secure: bool

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r}: expected http://host[:port][/prefix] or https://...")
        if ":" in parts.hostname:
            # treq (hyperlink) cannot encode an IPv6 literal: name the host instead.
            raise ValueError(f"{url!r}: IPv6 literals are not supported, use a host name")
        if parts.query or parts.fragment:
            raise ValueError(f"{url!r}: pushd's base URL takes no query or fragment")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ValueError(f"{url!r}: bad port") from None
        base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        return cls(base, parts.hostname, port, parts.scheme == "https")

    def publish_url(self, channel: str) -> str:
        return f"{self.base}/channels/{quote(channel, safe='')}"

    def ws_url(self, query: str) -> str:
        scheme, rest = self.base.split(":", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}:{rest}/ws?{query}"

    def sse_url(self, query: str) -> str:
        return f"{self.base}/sse?{query}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def connect_reason(exc: BaseException, target: Target) -> str | None:
    """A connection failure (maybe wrapped by the HTTP client) in a few words."""
    if isinstance(exc, ResponseNeverReceived | ResponseFailed) and exc.reasons:
        exc = exc.reasons[0].value
    if isinstance(exc, error.ConnectionRefusedError):
        return f"connection refused by {target.address} (is pushd running and listening there?)"
    if isinstance(exc, error.DNSLookupError):
        return f"cannot resolve {target.host}"
    if isinstance(exc, error.TimeoutError | error.TCPTimedOutError):
        return f"connecting to {target.address} timed out"
    if isinstance(exc, error.ConnectionLost | error.ConnectionDone):
        return f"{target.address} closed the connection"
    if isinstance(exc, error.ConnectError):
        return f"cannot connect to {target.address}: {exc}"
    if type(exc).__module__.startswith("OpenSSL"):
        return f"TLS with {target.address} failed: {exc}"
    return None


def target_arg(text: str) -> Target:
    """An argparse type: pushd's base URL."""
    try:
        return Target.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def channel_arg(text: str) -> str:
    """An argparse type: a channel name."""
    if not is_channel(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: channel names match [A-Za-z0-9_.:@=+-]{{1,128}}, optionally #ids"
        )
    return text


def secret_option(parser: argparse.ArgumentParser, flag: str, env: str, what: str) -> None:
    """`flag` (an API key, a token) defaulting to $`env`, which keeps it out of `ps`."""
    parser.add_argument(flag, default=os.environ.get(env) or None, help=f"{what} (default: ${env})")


def parse_command(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    """The parsed command line, or the status argparse exits with (2, or 0 for --help)."""
    try:
        return p.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2


@contextmanager
def verbose_log(enabled: bool, err: TextIO) -> Iterator[None]:
    """With -v: Twisted's and Autobahn's log on `err` for the command's run."""
    observer = cast(ILogObserver, textFileLogObserver(err)) if enabled else None
    if observer is not None:
        globalLogPublisher.addObserver(observer)
    try:
        yield
    finally:
        if observer is not None:
            globalLogPublisher.removeObserver(observer)


def run_command(
    run: Callable[[Any, list[str]], Awaitable[int]], argv: list[str] | None = None
) -> None:
    """A console script on Twisted: runs `run(reactor, argv)`, exits with its status."""
    # Until logging begins, Twisted prints critical events (a TLS verification
    # failure's traceback) to stderr: the one-line reason says it all (-v shows them).
    globalLogBeginner.beginLoggingTo([], redirectStandardIO=False)

    async def react_main(reactor: Any, args: list[str]) -> None:
        code = await run(reactor, args)
        if code:
            raise SystemExit(code)

    react(react_main, (sys.argv[1:] if argv is None else argv,))
