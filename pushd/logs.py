"""pushd's log: text, or JSON lines for machines (`--log-format text|json`).

Under twistd, pushd's option parsing (pushd.tap) picks the log observer
before twistd sets it up (`configure`): twistd's `--logger` is set to
`text_lines` or `json_lines` unless the operator gave `--logger` or
`--syslog`, and both write where twistd would (stdout with `-n`, else
`--logfile`, default twistd.log). `twistd --logger=pushd.logs.json_lines`
works too.

A JSON line is one object per event::

    {"time": "2026-11-29T20:31:02.123Z", "level": "info",
     "logger": "pushd.transports.websocket",
     "message": "websocket client 127.0.0.1 admitted (user None)",
     "peer": "127.0.0.1", "sub": null}

`time` is ISO-8601 UTC with milliseconds, `level` the level's name (debug,
info, warn, error, critical), `logger` the event's namespace, `message` the
rendered text; then the event's own fields, JSON-safe (`repr` of what is
not), and `failure` (the traceback's text) when there is one. Twisted's
internals (`log_logger`, `log_source`, `log_format`...) are left out; the
secrets of the configuration (API keys, the token secret, passwords in
URLs) never appear: a field named like a secret is masked, and the values
themselves are masked wherever they would appear.
"""

from __future__ import annotations

import json
import math
import re
import signal
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    LogEvent,
    PredicateResult,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.failure import Failure

#: Keys Twisted's legacy system puts in events (twisted.python.log, and its
#: observers, which add them to every event they see): not the event's own fields.
_TWISTED_KEYS = frozenset({"message", "time", "system", "format", "isError", "logLevel", "printed"})
#: Keys of a legacy error (`isError` set), the failure and its text: not fields either.
_LEGACY_ERROR_KEYS = frozenset({"why", "failure"})
#: Names of fields whose values are masked whatever they hold.
_SECRET_NAME = re.compile(r"password|passwd|secret|token|api_?key|authorization", re.IGNORECASE)
MASK = "***"

#: Lines of Twisted's and txredisapi's in their words, left out. Twisted's
#: listening ports say that they start and stop, naming the factory's class
#: ("QuietSite starting on 8080", "(TCP Port 8080 Closed)"), whatever the
#: factory's `noisy`: pushd's banner says it. txredisapi says "Discarding dead
#: connection." when a command finds a connection of its pool gone, and "Redis
#: error: could not auth: ..." at each refused attempt of each connection:
#: pushd says when Redis is lost or refuses, once (pushd.broker.redis.reachability).
_CHATTER = re.compile(
    r"^(?:\w+ starting on \S+|\((?:TCP |UNIX |SSL )?Port \S+ Closed\)"
    r"|Discarding dead connection\.|Redis error: could not (?:auth|set dbid=\S*): .*)$",
    re.DOTALL,
)


class _Settings:
    """What `configure` was told: where the log goes (a file name, None for
    stdout) and the strings no line may show."""

    destination: str | None = None
    secrets: tuple[str, ...] = ()


_settings = _Settings()


def configure(twistd: MutableMapping[str, Any], log_format: str, secrets: Iterable[str]) -> None:
    """Pick the log observer of a twistd run: `twistd` is twistd's own options
    (`pushd.tap.Options.parent`, parsed before pushd's), `log_format` "text"
    or "json", `secrets` the strings to mask in JSON lines."""
    _settings.secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))
    logfile = twistd.get("logfile") or None
    nodaemon = bool(twistd.get("nodaemon") or twistd.get("debug"))
    if logfile == "-" or (logfile is None and nodaemon):
        _settings.destination = None
    else:
        _settings.destination = logfile or "twistd.log"
    if twistd.get("logger") or twistd.get("syslog"):
        return  # the operator's choice (`--logger=pushd.logs.json_lines` included)
    if logfile == "-" and not nodaemon:
        return  # twistd refuses it ("Daemons cannot log to stdout")
    # A name: twistd's own option handling (run after pushd's) imports it.
    twistd["logger"] = f"{__name__}.{'json_lines' if log_format == 'json' else 'text_lines'}"


def _stream() -> Any:
    """A text file (IO[str]): stdout or a twisted.python.logfile.LogFile."""
    if _settings.destination is None:
        return sys.stdout
    from twisted.python.logfile import LogFile

    log_file = LogFile.fromFullPath(_settings.destination)
    if not signal.getsignal(signal.SIGUSR1):
        # As twistd does for its log file: SIGUSR1 rotates it.
        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return log_file


#: Twisted's factories that are `noisy` (its default: twisted.web.client's, for
#: --auth-url's requests) say each start and stop, with their repr.
_FACTORY_CHATTER = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}"})


def _not_chatter(event: LogEvent) -> Any:
    """A log filter predicate (ILogFilterPredicate): no to the chatter."""
    if event.get("log_format") in _FACTORY_CHATTER:
        return PredicateResult.no
    text = event.get("log_text")
    legacy = event.get("log_namespace") == "log_legacy"
    if legacy and isinstance(text, str) and _CHATTER.match(text):
        return PredicateResult.no
    return PredicateResult.maybe


# Observers are typed Any: ILogObserver is a zope interface, which mypy does not
# see classes provide.
def quiet(observer: Any) -> Any:
    """`observer` (an ILogObserver) without the libraries' chatter (`_CHATTER`)."""
    predicates: list[Any] = [_not_chatter]
    return FilteringLogObserver(observer, predicates)


def text_lines() -> Any:
    """A twistd `--logger`: twistd's own text lines, without the libraries' chatter."""
    return quiet(textFileLogObserver(_stream()))


def json_lines() -> Any:
    """A twistd `--logger`: one JSON object a line (see the module's doc), on
    stdout with `-n` (twistd's `--logfile` when given)."""
    secrets = _settings.secrets
    return quiet(FileLogObserver(_stream(), lambda event: json_line(event, secrets)))


def json_line(event: LogEvent, secrets: Iterable[str] = ()) -> str:
    """`event` as one JSON line (with its newline); `secrets` are masked."""
    record = as_record(event, secrets)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n"


def as_record(event: Mapping[str, Any], secrets: Iterable[str] = ()) -> dict[str, Any]:
    """The JSON object of `event`: time, level, logger, message, the event's
    own fields (JSON-safe), failure; every one of `secrets` in a string of it
    replaced by MASK."""
    level = getattr(event.get("log_level"), "name", None)
    record: dict[str, Any] = {
        "time": _iso_time(event.get("log_time")),
        "level": level if isinstance(level, str) else "info",
        "logger": str(event.get("log_namespace", "")),
        "message": formatEvent(dict(event)),
    }
    failure = event.get("log_failure", event.get("failure"))
    legacy_error = "isError" in event
    for key, value in event.items():
        if not isinstance(key, str) or key.startswith("log_") or key in _TWISTED_KEYS:
            continue
        if legacy_error and key in _LEGACY_ERROR_KEYS:
            continue
        name = key if key not in record else f"{key}_"
        record[name] = MASK if _SECRET_NAME.search(key) else _json_safe(value)
    if isinstance(failure, Failure):
        record["failure"] = failure.getTraceback()
    masked: dict[str, Any] = _masked(record, tuple(secrets))
    return masked


def _masked(value: Any, secrets: tuple[str, ...]) -> Any:
    """`value` (JSON-safe) with each of `secrets` in its strings replaced by
    MASK; masked in the values, not in the JSON text, so that no secret can
    break a line's JSON."""
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            if secret in value:
                value = value.replace(secret, MASK)
        return value
    if isinstance(value, list):
        return [_masked(v, secrets) for v in value]
    if isinstance(value, dict):
        return {_masked(k, secrets): _masked(v, secrets) for k, v in value.items()}
    return value


def _iso_time(seconds: Any) -> str:
    try:
        when = datetime.fromtimestamp(float(seconds), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        when = datetime.now(UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_safe(value: Any, depth: int = 0) -> Any:
    """`value` as JSON can hold it: numbers, strings, lists and objects as
    they are (NaN and infinities as text), anything else as its repr."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if depth < 4 and isinstance(value, list | tuple | set | frozenset):
        return [_json_safe(v, depth + 1) for v in value]
    if depth < 4 and isinstance(value, dict):
        return {
            str(k): MASK if _SECRET_NAME.search(str(k)) else _json_safe(v, depth + 1)
            for k, v in value.items()
        }
    return repr(value)
