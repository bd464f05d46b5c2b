"""`pushd-cli`: publish and subscribe from the command line, with `pushd.client`.

    pushd-cli publish CHANNEL DATA [--json] [--url U] [--api-key K] [--retries N]
                      [--idempotency-key K]
    pushd-cli subscribe CHANNEL [CHANNEL...] [--url U] [--token T] [--since ID] [--count N]
    python -m pushd.client.cli ...

`publish` sends DATA (`-`: standard input) as text, or as JSON with `--json`,
and prints the message id. `subscribe` prints every message envelope as one JSON
line, reconnecting and resuming every channel after a lost connection (a
channel that printed nothing yet from the position pushd gave), until
interrupted or, with `--count N`, after N messages. The URL, key and token
default to $PUSHD_CLI_URL (else http://127.0.0.1:8080), $PUSHD_CLI_API_KEY and
$PUSHD_CLI_TOKEN. Exit status: 0 done, 1 refused or failed (one line on
stderr), 2 bad command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

from pushd import __version__
from pushd.client import console
from pushd.client.publisher import Publisher, PushdError
from pushd.client.subscriber import Subscriber
from pushd.message import load_json, parse_id

DEFAULT_URL = "http://127.0.0.1:8080"


class CliError(Exception):
    """The one-line reason the command failed."""


def _url(text: str) -> str:
    console.target_arg(text)  # argparse's error for a bad URL
    return text


def _id(text: str) -> str:
    try:
        parse_id(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a message id is <ms>-<seq>") from None
    return text


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number above 0")
    return int(text)


def parser() -> argparse.ArgumentParser:
    """The command line of `pushd-cli`."""
    p = argparse.ArgumentParser(prog="pushd-cli", description="Publish to and subscribe on pushd.")
    p.add_argument("--version", action="version", version=f"pushd-cli {__version__}")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--url",
            type=_url,
            default=os.environ.get("PUSHD_CLI_URL") or DEFAULT_URL,
            help=f"pushd's base URL (default: $PUSHD_CLI_URL or {DEFAULT_URL})",
        )
        sub.add_argument(
            "-v", "--verbose", action="store_true", help="show the client's log on stderr"
        )

    pub = commands.add_parser("publish", help="publish one message and print its id")
    pub.add_argument("channel", type=console.channel_arg, metavar="CHANNEL")
    pub.add_argument("data", metavar="DATA", help="the message (-: read standard input)")
    pub.add_argument("--json", action="store_true", help="DATA is JSON (default: text)")
    console.secret_option(pub, "--api-key", "PUSHD_CLI_API_KEY", "producer key")
    pub.add_argument(
        "--retries",
        type=int,
        default=5,
        help="tries again after a 503, a 504 or a lost connection, with backoff, under"
        " the same Idempotency-Key (default: 5)",
    )
    pub.add_argument(
        "--idempotency-key",
        help="the publish's Idempotency-Key (default: a random one, kept across retries)",
    )
    common(pub)

    sub = commands.add_parser("subscribe", help="print message envelopes as JSON lines")
    sub.add_argument("channels", type=console.channel_arg, nargs="+", metavar="CHANNEL")
    console.secret_option(sub, "--token", "PUSHD_CLI_TOKEN", "subscriber token")
    sub.add_argument("--since", type=_id, help="first the retained messages after this id")
    sub.add_argument("--count", type=_count, help="stop after this many messages")
    common(sub)
    return p


async def _publish(reactor: Any, args: argparse.Namespace, out: TextIO) -> None:
    text = sys.stdin.read() if args.data == "-" else args.data
    data: Any = text
    if args.json:
        try:
            data = load_json(text)  # strict: NaN, Infinity, 1e400 refused
        except ValueError as exc:
            raise CliError(f"DATA is not JSON: {exc}") from None
    publisher = Publisher(args.url, args.api_key, reactor=reactor, retries=max(0, args.retries))
    try:
        msg_id = await publisher.publish(args.channel, data, idempotency_key=args.idempotency_key)
    except PushdError as exc:
        raise CliError(str(exc)) from None
    except Exception as exc:
        reason = console.connect_reason(exc, publisher.target)
        if reason is None:
            raise
        raise CliError(reason) from None
    finally:
        await publisher.close()
    print(msg_id, file=out, flush=True)


async def _subscribe(reactor: Any, args: argparse.Namespace, out: TextIO) -> None:
    subscriber = Subscriber(
        args.url, args.channels, token=args.token, since=args.since, reactor=reactor
    )
    seen = 0
    try:
        async for envelope in subscriber:
            line = json.dumps(envelope, separators=(",", ":"), allow_nan=False)
            print(line, file=out, flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                return
    except PushdError as exc:
        raise CliError(str(exc)) from None
    finally:
        await subscriber.close()
    if subscriber.close_code is not None:
        raise CliError(
            f"disconnected by the application ({subscriber.close_code} "
            f"{subscriber.close_reason or ''})".rstrip()
        )


async def run(
    reactor: Any, argv: list[str], out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """The command as a function: its exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = console.parse_command(parser(), argv)
    if isinstance(args, int):
        return args
    with console.verbose_log(args.verbose, err):
        try:
            if args.command == "publish":
                await _publish(reactor, args, out)
            else:
                await _subscribe(reactor, args, out)
        except CliError as exc:
            print(f"pushd-cli: {exc}", file=err, flush=True)
            return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    """The `pushd-cli` console script."""
    console.run_command(run, argv)


if __name__ == "__main__":
    main()
