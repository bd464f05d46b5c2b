"""`pushd`: one command for the operator, with subcommands.

    pushd run [--pidfile FILE] [options]   the server (twistd -n pushd [options])
    pushd version                          pushd's version, then Python's, Twisted's, Autobahn's
    pushd token --sub ID --channel C --publish C --info JSON --ttl 1h
                                           a signed subscriber token (JWT) on stdout
    pushd check-token TOKEN                "valid" and its claims, or "invalid: <why>" (status 1)
    pushd check-config [options]           the effective settings, where each came from
    pushd publish|subscribe ...            `pushd-cli publish|subscribe ...`
    pushd check URL ...                    `pushd-check URL ...`

`token` and `check-token` read the token settings as the server does (the
option, then PUSHD_<OPTION>, then `--config FILE`). Exit status: 0 done, 1
refused or failed (one line on stderr), 2 bad command line or settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn, TextIO

from pushd import __version__

#: The subcommands and their one-line help, in `pushd --help`'s order.
SUBCOMMANDS = {
    "run": "run the server in the foreground (twistd -n pushd); `pushd run --help`: its options",
    "version": "print pushd's version, then Python's, Twisted's and Autobahn's",
    "token": "print a signed subscriber token (JWT, HS256 with the server's --token-secret)",
    "check-token": "check a token with the server's settings: its claims, or why it is refused",
    "check-config": "print the effective settings and where each came from (secrets masked)",
    "publish": "publish a message (as pushd-cli publish)",
    "subscribe": "print the messages of channels (as pushd-cli subscribe)",
    "check": "check a running pushd end to end (as pushd-check)",
}

#: The server options `token` and `check-token` read, as `pushd.config.load` names them.
TOKEN_OPTIONS = (
    "token-secret",
    "token-audience",
    "token-public-key",
    "token-jwks-url",
)


class CommandError(Exception):
    """The one-line reason a subcommand failed, and its exit status."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pushd",
        description="pushd, a push gateway: the server and its tools.",
        epilog="`pushd COMMAND --help` shows a command's options.",
    )
    p.add_argument("--version", action="store_true", help="as `pushd version`")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in SUBCOMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


# --- run ---------------------------------------------------------------------


def twistd_argv(args: Sequence[str]) -> list[str]:
    """twistd's command line for `pushd run ARGS`: in the foreground, the pid file
    only when `--pidfile FILE` is among ARGS (taken out; the rest is pushd's)."""
    pidfile = ""
    rest: list[str] = []
    items = iter(args)
    for arg in items:
        if arg == "--pidfile":
            pidfile = next(items, "")
            if not pidfile:
                raise CommandError("error: --pidfile needs a FILE")
        elif arg.startswith("--pidfile="):
            pidfile = arg.partition("=")[2]
        else:
            rest.append(arg)
    return ["twistd", "--nodaemon", f"--pidfile={pidfile}", "pushd", *rest]


def _options_help(usage: str, what: str, *extra: str) -> str:
    """The plugin's option help (as `twistd pushd --help` shows it) under `usage`."""
    from pushd.tap import Options

    options = str(Options()).split("\n", 1)[1]
    options = options.replace("Options:\n", "Options:\n" + "".join(extra), 1)
    return f"Usage: {usage}\n{what}\n{options}"


def _run_help(out: TextIO) -> None:
    out.write(
        _options_help(
            "pushd run [options]",
            "Runs the server in the foreground (twistd -n pushd [options]).",
            "      --pidfile=                 write the process id to this file [default: none]\n",
        )
    )


def run_server(args: Sequence[str]) -> None:
    """twistd's runner, in this process, with `twistd_argv(args)`: returns when
    the server has stopped (twistd exits on a bad option or setting)."""
    if any(a in ("-h", "--help") for a in args):
        _run_help(sys.stdout)
        return
    if "--version" in args:  # twistd's own would name Twisted's version only
        print("\n".join(version_lines()))
        return
    argv = twistd_argv(args)
    from twisted.scripts.twistd import run

    sys.argv = argv
    run()


# --- version -----------------------------------------------------------------


def version_lines() -> list[str]:
    from importlib.metadata import version

    return [
        f"pushd {__version__}",
        f"Python {platform.python_version()}",
        f"Twisted {version('twisted')}",
        f"Autobahn {version('autobahn')}",
    ]


# --- token and check-token ---------------------------------------------------

_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> int:
    """Seconds of `30s`, `15m`, `1h`, `7d` or a plain number of seconds (above 0)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a duration above 0: 30s, 15m, 1h, 7d or seconds"
        )
    return int(match.group(1)) * _UNITS[match.group(2)]


#: `--info` not given (`--info null` gives a null `info`).
_NO_INFO = object()


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({e})") from None


def _name(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _settings_options(p: argparse.ArgumentParser) -> None:
    """The server's token options, read as the server reads them."""
    p.add_argument("-c", "--config", metavar="FILE", help="INI file with a [pushd] section")
    p.add_argument("--token-secret", metavar="S", help="HS256 secret (or PUSHD_TOKEN_SECRET)")
    p.add_argument("--token-audience", metavar="AUD", help="the `aud` tokens carry")


def _token_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pushd token",
        description="Print a subscriber token (JWT) pushd accepts: HS256 with the server's "
        "token secret (--token-secret, PUSHD_TOKEN_SECRET or --config's token-secret), or "
        "RS256/ES256 with --private-key. With a token audience configured, it carries `aud`.",
    )
    p.add_argument("--sub", type=_name, metavar="ID", help="the user id (`sub` claim)")
    p.add_argument(
        "--channel",
        action="append",
        type=_name,
        default=[],
        metavar="C",
        help="a channel (pattern, `*` any run of characters) it may subscribe to; repeatable",
    )
    p.add_argument(
        "--publish",
        action="append",
        type=_name,
        default=[],
        metavar="C",
        help="a channel (pattern) it may publish to; repeatable",
    )
    p.add_argument(
        "--info",
        type=_json_value,
        default=_NO_INFO,
        metavar="JSON",
        help="a JSON value (null included): the `info` claim",
    )
    p.add_argument(
        "--ttl",
        type=duration,
        default=3600,
        metavar="DURATION",
        help="how long it is valid: 30s, 15m, 1h, 7d or seconds (default: 1h)",
    )
    p.add_argument(
        "--private-key",
        metavar="FILE",
        help="sign RS256 (RSA) or ES256 (EC P-256) with this PEM private key instead",
    )
    p.add_argument("--kid", metavar="ID", help="with --private-key: the `kid` header (JWKS)")
    _settings_options(p)
    return p


def _check_token_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pushd check-token",
        description="Check a subscriber token as the server would, with its token settings "
        "(options, PUSHD_<OPTION>, --config). Prints `valid` and the claims, or "
        "`invalid: <why>` with exit status 1.",
    )
    p.add_argument("token", metavar="TOKEN")
    _settings_options(p)
    p.add_argument("--token-public-key", metavar="FILE", help="PEM public key (RS256/ES256)")
    p.add_argument("--token-jwks-url", metavar="URL", help="JWKS of the token keys")
    return p


def _load_settings(args: argparse.Namespace, environ: Any) -> Any:
    from pushd.config import ConfigError, load

    given = {name: getattr(args, name.replace("-", "_"), None) for name in TOKEN_OPTIONS}
    try:
        return load({"config": args.config, **given}, environ)
    except ConfigError as e:
        raise CommandError(f"error: {e}") from None


def _private_key(path: str) -> tuple[Any, str]:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        with open(path, "rb") as f:
            key = load_pem_private_key(f.read(), password=None)
    except OSError as e:
        raise CommandError(f"error: --private-key: cannot read {path}: {e.strerror}") from None
    except (ValueError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CommandError(f"error: --private-key: not a PEM private key ({first})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    raise CommandError("error: --private-key: neither RSA (RS256) nor EC P-256 (ES256)")


def make_token(args: argparse.Namespace, environ: Any, now: float | None = None) -> str:
    """The token `pushd token` prints; CommandError without a secret or key."""
    import jwt

    config = _load_settings(args, environ)
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"iat": issued, "exp": issued + args.ttl}
    if args.sub is not None:
        claims["sub"] = args.sub
    if args.channel:
        claims["channels"] = args.channel
    if args.publish:
        claims["publish"] = args.publish
    if args.info is not _NO_INFO:
        claims["info"] = args.info
    if config.token_audience is not None:
        claims["aud"] = config.token_audience
    if args.private_key is not None:
        key, algorithm = _private_key(args.private_key)
        headers = {"kid": args.kid} if args.kid else None
        return jwt.encode(claims, key, algorithm=algorithm, headers=headers)
    if args.kid:
        raise CommandError("error: --kid goes with --private-key")
    if config.token_secret is None:
        raise CommandError(
            "error: no token secret: give --token-secret, PUSHD_TOKEN_SECRET or "
            "token-secret in --config (or sign with --private-key)"
        )
    return jwt.encode(claims, config.token_secret, algorithm="HS256")


def describe_grants(grants: Any, claims: dict[str, Any], now: float) -> list[str]:
    """The lines `check-token` prints after `valid`."""
    lines = [
        f"sub: {grants.sub if grants.sub is not None else '(none)'}",
        f"channels: {', '.join(grants.channels) or '(none)'}",
        f"publish: {', '.join(grants.publish) or '(none)'}",
    ]
    if "info" in claims:
        lines.append(f"info: {json.dumps(claims['info'], ensure_ascii=False)}")
    if "aud" in claims:
        lines.append(f"aud: {claims['aud']}")
    if grants.expires is not None:
        try:
            when = datetime.fromtimestamp(grants.expires, UTC).isoformat()
        except (OverflowError, ValueError, OSError):
            when = f"{grants.expires:.0f} s after the epoch, past any calendar date"
        lines.append(f"expires: {when} ({max(0, int(grants.expires - now))} s left)")
    return lines


async def _verified(verifier: Any, token: str) -> Any:
    result = verifier.verify(token)
    from twisted.internet.defer import Deferred

    if isinstance(result, Deferred):
        result = await result
    return result


def check_token(args: argparse.Namespace, environ: Any, out: TextIO) -> int:
    """`pushd check-token`: 0 valid, 1 invalid; CommandError (2) without settings."""
    import jwt

    from pushd.auth import AuthError, make_verifier
    from pushd.config import ConfigError

    config = _load_settings(args, environ)
    if config.token_jwks_url is None:
        try:
            verifier = make_verifier(config)
        except ConfigError as e:
            raise CommandError(f"error: {e}") from None
        if verifier is None:
            raise CommandError(
                "error: no --token-secret, --token-public-key or --token-jwks-url "
                "(option, PUSHD_<OPTION> or --config)"
            )
        try:
            grants = verifier.verify(args.token)
        except AuthError as e:
            return _invalid(e, out)
    else:
        grants = _verify_on_reactor(config, args.token)
        if isinstance(grants, AuthError):
            return _invalid(grants, out)
    claims = jwt.decode(args.token, options={"verify_signature": False})
    print("valid", file=out)
    for line in describe_grants(grants, claims, time.time()):
        print(line, file=out)
    return 0


def _invalid(error: Any, out: TextIO) -> int:
    print(f"invalid: {error.message.removeprefix('invalid token: ')}", file=out)
    return 1


def _verify_on_reactor(config: Any, token: str) -> Any:
    """The grants (or the AuthError) of a token whose key comes from a JWKS: the
    fetch needs the reactor, run here until the answer."""
    from twisted.internet import reactor as _reactor
    from twisted.internet.defer import Deferred
    from twisted.python.failure import Failure

    from pushd.auth import AuthError, make_verifier
    from pushd.config import ConfigError

    reactor: Any = _reactor
    outcome: list[Any] = []

    def done(result: Any) -> None:
        outcome.append(result.value if isinstance(result, Failure) else result)
        reactor.stop()

    def verify() -> None:
        # Whatever happens, the reactor stops: an error left in a callback would hang.
        try:
            verifier = make_verifier(config, reactor)
        except Exception as e:
            done(e)
            return
        Deferred.fromCoroutine(_verified(verifier, token)).addBoth(done)

    reactor.callWhenRunning(verify)
    reactor.run(installSignalHandlers=False)
    result = outcome[0]
    if isinstance(result, ConfigError):
        raise CommandError(f"error: {result}")
    if isinstance(result, BaseException) and not isinstance(result, AuthError):
        raise result
    return result


# --- check-config ------------------------------------------------------------


def _shown(option: Any, values: Sequence[str]) -> str:
    from pushd.config import SECRET_OPTIONS, URL_OPTIONS, without_password

    if option.name in SECRET_OPTIONS:
        return " ".join("********" for _ in values)
    if option.name in URL_OPTIONS:
        return " ".join(without_password(v) for v in values)
    return " ".join(values)


def _default(option: Any) -> str:
    value = option.default
    if value is None or value == ():
        return "(none)"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def settings_lines(config: Any, config_file: tuple[str, str] | None) -> list[str]:
    """`check-config`'s table: option, effective value (secrets masked), source."""
    from pushd.config import OPTIONS

    rows = []
    for option in OPTIONS:
        given = config.given.get(option.key)
        if given:
            rows.append((option.name, _shown(option, given), config.sources[option.key]))
        elif option.key == "demo":
            rows.append((option.name, "off" if config.uses_redis else "on", "default"))
        else:
            rows.append((option.name, _default(option), "default"))
    width = max(len(name) for name, _, _ in rows)
    value_width = min(48, max(len(value) for _, value, _ in rows))
    where = f"{config_file[0]} ({config_file[1]})" if config_file else "(none)"
    lines = [f"{'config':<{width}}  {where}"]
    for name, value, source in rows:
        lines.append(f"{name:<{width}}  {value:<{value_width}}  {source}")
    return lines


def check_config(args: Sequence[str], environ: Any, out: TextIO) -> int:
    """`pushd check-config [options]`: parsed as `twistd pushd` parses them."""
    from twisted.python import usage

    from pushd.tap import Options

    if any(a in ("-h", "--help") for a in args):
        out.write(
            _options_help(
                "pushd check-config [options]",
                "Prints the settings `pushd run [options]` would use, each with where it "
                "came from\n(command line, env PUSHD_<OPTION>, config file, default); "
                "secrets masked.",
            )
        )
        return 0
    options = Options()
    try:
        # A bad setting: one line and exit 2, from tap.Options.postOptions.
        usage.Options.parseOptions(options, list(args))
    except usage.UsageError as e:
        raise CommandError(f"error: {e}") from None
    config_file = None
    if options.get("config"):
        config_file = (options["config"], "command line")
    elif environ.get("PUSHD_CONFIG"):
        config_file = (environ["PUSHD_CONFIG"], "env PUSHD_CONFIG")
    for line in settings_lines(options.config, config_file):
        print(line.rstrip(), file=out)
    return 0


# --- the command -------------------------------------------------------------


def _fail(command: str, error: CommandError) -> NoReturn:
    print(f"pushd {command}: {error}", file=sys.stderr, flush=True)
    raise SystemExit(error.status)


def main(argv: Sequence[str] | None = None) -> None:
    """The `pushd` console script: exits with the subcommand's status."""
    args = list(sys.argv[1:] if argv is None else argv)
    command, rest = (args[0], args[1:]) if args else ("", [])
    try:
        if command == "run":
            run_server(rest)
            return
        if command in ("publish", "subscribe"):
            from pushd.client import cli

            cli.main([command, *rest])
            return
        if command == "check":
            from pushd.client import check

            check.main(rest)
            return
        if command == "version":
            argparse.ArgumentParser(
                prog="pushd version", description=SUBCOMMANDS["version"]
            ).parse_args(rest)
            print("\n".join(version_lines()))
            return
        if command == "token":
            print(make_token(_token_parser().parse_args(rest), os.environ))
            return
        if command == "check-token":
            parsed = _check_token_parser().parse_args(rest)
            raise SystemExit(check_token(parsed, os.environ, sys.stdout))
        if command == "check-config":
            raise SystemExit(check_config(rest, os.environ, sys.stdout))
    except CommandError as e:
        _fail(command, e)
    except BrokenPipeError:
        # `pushdctl check-token ... | head -1`: the reader left; no traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    top = _top_parser().parse_args(args)  # --help, --version, or an unknown command
    if top.version:
        print("\n".join(version_lines()))
        return
    _top_parser().print_help(sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
