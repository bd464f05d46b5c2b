"""pushd's settings: one table of options, read from the command line, the
environment (`PUSHD_<OPTION>`), an INI file and the defaults, in that order of
precedence.

A bad value raises ConfigError with one line that names the option and where
the value came from.
"""

from __future__ import annotations

import configparser
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from pushd.broker.redis.address import (
    RedisAddress,
    ShardAddress,
    check_shards,
    parse_redis_url,
)
from pushd.message import CHANNEL_RE


class ConfigError(ValueError):
    pass


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT")
    return host.strip("[]"), int(port)


_Number = TypeVar("_Number", int, float)


def _at_least(
    convert: Callable[[str], _Number], minimum: int, what: str
) -> Callable[[str], _Number]:
    def parse(text: str) -> _Number:
        try:
            value = convert(text)
        except ValueError:
            raise ValueError(f"must be {what}") from None
        if value < minimum:
            raise ValueError(f"must be {minimum} or more")
        return value

    return parse


_positive_int = _at_least(int, 1, "a whole number")
_non_negative_int = _at_least(int, 0, "a whole number")
_non_negative_float = _at_least(float, 0, "a number")


def _endpoint(text: str) -> str:
    from twisted.internet import endpoints

    if not text:
        raise ValueError("empty endpoint")
    # Validates the description without listening; an `ssl:` one reads its key
    # and certificate files here.
    try:
        endpoints._parseServer(text, None)
    except OSError as e:
        raise ValueError(f"cannot read {e.filename}: {e.strerror}") from None
    except Exception as e:
        if type(e).__module__.startswith("OpenSSL"):
            raise ValueError(f"not a PEM private key and its certificate ({_openssl(e)})") from None
        raise
    return text


def _openssl(error: Exception) -> str:
    """OpenSSL's reasons, from pyOpenSSL's `[(library, function, reason), ...]`."""
    reasons = error.args[0] if error.args and isinstance(error.args[0], list) else []
    words = [": ".join(p for p in r if p) for r in reasons if isinstance(r, tuple)]
    return "; ".join(w for w in words if w) or str(error) or type(error).__name__


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value <= 0:
        raise ValueError("must be more than 0")
    return value


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL")
    return text


def _public_key_file(path: str) -> str:
    from pushd.token_keys import read_public_key

    read_public_key(_non_empty(path))
    return path


def _workers(text: str) -> int:
    if text.strip().lower() == "auto":
        return os.cpu_count() or 1
    return _positive_int(text)


def _switch(text: str) -> bool:
    value = text.strip().lower()
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise ValueError("must be on or off")


def _channel_pattern(text: str) -> str:
    """A channel name, `*` standing for any run of characters."""
    if not text or not CHANNEL_RE.fullmatch(text.replace("*", "a")):
        raise ValueError("expected a channel name, `*` wildcards allowed")
    return text


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError("must be text or json")
    return value


def _network(text: str) -> IPv4Network | IPv6Network:
    try:
        # Host bits are dropped (10.1.2.3/8 is 10.0.0.0/8); a bare address is its own network.
        return ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError("expected an address or a network (10.0.0.0/8, fd00::/8)") from None


def _non_empty(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    repeatable: bool = False
    metavar: str = "VALUE"

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return "PUSHD_" + self.key.upper()


OPTIONS: tuple[Option, ...] = (
    Option(
        "listen",
        _endpoint,
        ("tcp:8080:interface=127.0.0.1",),
        "server endpoint string; repeatable",
        repeatable=True,
        metavar="ENDPOINT",
    ),
    Option(
        "redis",
        parse_redis_url,
        (),
        "redis://[:password@]host[:port][/db] or unix:///path.sock[?db=N]; repeatable: "
        "each is a shard (every node given the same list, in the same order); "
        "absent: the in-process memory broker",
        repeatable=True,
        metavar="URL",
    ),
    Option(
        "redis-sentinel",
        _host_port,
        (),
        "a Redis Sentinel, repeatable, with --redis-master; --redis then only gives db, password",
        repeatable=True,
        metavar="HOST:PORT",
    ),
    Option(
        "redis-master",
        _non_empty,
        (),
        "the master's name at the Sentinels; repeatable: each master is a shard",
        repeatable=True,
        metavar="NAME",
    ),
    Option("redis-prefix", _non_empty, "pushd:", "prefix of every Redis key and pub/sub channel"),
    Option("redis-pool-size", _positive_int, 10, "command connections to Redis", metavar="N"),
    Option(
        "redis-timeout",
        _positive_float,
        5.0,
        "seconds Redis may leave a command unanswered: then a publish answers 504 "
        "outcome_unknown, other commands 503 (checked every S seconds: within 2 S)",
        metavar="S",
    ),
    Option(
        "node-ttl",
        _at_least(float, 1, "a number of seconds, at least 1"),
        6.0,
        "seconds a node's subscriber counts outlive it in Redis (each node refreshes "
        "its own every second, or every S/3 when that is shorter)",
        metavar="S",
    ),
    Option(
        "api-key",
        _non_empty,
        (),
        "producer key, repeatable; absent: the producer API answers loopback clients only",
        repeatable=True,
        metavar="KEY",
    ),
    Option(
        "metrics-key",
        _non_empty,
        (),
        "key of GET /metrics (Bearer), repeatable, apart from producer keys; absent: "
        "/metrics answers loopback and --metrics-allow clients (and producer keys)",
        repeatable=True,
        metavar="KEY",
    ),
    Option(
        "metrics-allow",
        _network,
        (),
        "network that may GET /metrics without a key (10.0.0.0/8, 192.0.2.7), repeatable",
        repeatable=True,
        metavar="CIDR",
    ),
    Option(
        "max-message-size",
        _positive_int,
        65536,
        "largest message body or client frame, in bytes",
        metavar="B",
    ),
    Option(
        "max-batch-size",
        _positive_int,
        1048576,
        "largest body of a batch publish (POST /publish), in bytes",
        metavar="B",
    ),
    Option(
        "push-event-list",
        _non_empty,
        "message_gateway_event",
        "the Redis list POST /push pushes channel names to (nginx+Lua gateway contract)",
        metavar="KEY",
    ),
    Option("history-size", _positive_int, 100, "messages kept per channel", metavar="N"),
    Option(
        "history-ttl",
        _positive_int,
        3600,
        "seconds a channel's history lives after its last message",
        metavar="S",
    ),
    Option(
        "ping-interval",
        _non_negative_float,
        30.0,
        "seconds between WebSocket pings (0: off)",
        metavar="S",
    ),
    Option(
        "ping-timeout",
        _non_negative_float,
        10.0,
        "seconds to wait for a pong before dropping the peer",
        metavar="S",
    ),
    Option(
        "token-secret",
        _non_empty,
        None,
        "HS256 secret of subscriber tokens (JWT); absent (and no --token-public-key or "
        "--token-jwks-url): anonymous subscribers",
        metavar="S",
    ),
    Option("token-audience", _non_empty, None, "required `aud` claim of tokens", metavar="AUD"),
    Option(
        "token-public-key",
        _public_key_file,
        None,
        "PEM public key file of RS256 (RSA) or ES256 (EC P-256) subscriber tokens",
        metavar="FILE",
    ),
    Option(
        "token-jwks-url",
        _http_url,
        None,
        "JWKS URL of RS256/ES256 subscriber tokens' keys (by `kid`; cached 5 minutes, "
        "fetched again for an unknown `kid` at most every 30 s)",
        metavar="URL",
    ),
    Option(
        "auth-url",
        _http_url,
        None,
        "the application's URL asked at connect for a client without token",
        metavar="URL",
    ),
    Option("auth-timeout", _positive_float, 5.0, "seconds --auth-url may take", metavar="S"),
    Option(
        "allowed-origin",
        _non_empty,
        (),
        "allowed Origin of browser pages, `*` wildcards, repeatable; absent: any",
        repeatable=True,
        metavar="PATTERN",
    ),
    Option(
        "trusted-proxies",
        _non_negative_int,
        0,
        "proxies in front of pushd that append to X-Forwarded-For (nginx: 1)",
        metavar="N",
    ),
    Option(
        "personal-channel",
        _non_empty,
        "user",
        "a client with a token `sub` also joins <name>#<sub>; POST /users/{user} publishes there",
        metavar="NAME",
    ),
    Option(
        "presence",
        _channel_pattern,
        (),
        "channels (`*` wildcards) whose subscribers are members, listed by "
        "GET /channels/{channel}/presence and the `presence` frame; repeatable",
        repeatable=True,
        metavar="PATTERN",
    ),
    Option(
        "join-leave",
        _channel_pattern,
        (),
        "channels (`*` wildcards) whose subscribers hear `join` and `leave` when a "
        "member comes or goes (presence is on for them too); repeatable",
        repeatable=True,
        metavar="PATTERN",
    ),
    Option(
        "max-presence-list",
        _positive_int,
        1000,
        "members a presence answer lists at most (its count and users are exact)",
        metavar="N",
    ),
    Option(
        "max-connections-per-ip",
        _positive_int,
        1000,
        "open WebSocket and stream connections from one client address",
        metavar="N",
    ),
    Option("max-subscriptions", _positive_int, 100, "channels per connection", metavar="N"),
    Option(
        "publish-rate",
        _positive_float,
        10.0,
        "messages per second a connection may publish (token bucket)",
        metavar="R",
    ),
    Option("publish-burst", _positive_int, 20, "burst of the publish token bucket", metavar="N"),
    Option(
        "max-send-buffer",
        _positive_int,
        1048576,
        "bytes queued for a client that does not read before it is dropped (4008)",
        metavar="B",
    ),
    Option(
        "admin-password",
        _non_empty,
        None,
        "password of the admin console at /admin (absent, and no --admin-key: /admin is off)",
        metavar="S",
    ),
    Option(
        "admin-key",
        _non_empty,
        (),
        "key of the admin JSON API (Authorization: Bearer), repeatable",
        repeatable=True,
        metavar="KEY",
    ),
    Option(
        "keepalive",
        _positive_float,
        15.0,
        "seconds between keep-alives on SSE and NDJSON streams",
        metavar="S",
    ),
    Option(
        "handshake-timeout",
        _positive_float,
        10.0,
        "seconds a client has to send its request headers",
        metavar="S",
    ),
    Option(
        "max-header-size",
        _positive_int,
        16384,
        "bytes of request line (URL) and headers",
        metavar="B",
    ),
    Option(
        "shutdown-timeout",
        _positive_float,
        10.0,
        "seconds a stop may take to say goodbye to clients and finish publishes",
        metavar="S",
    ),
    Option(
        "workers",
        _workers,
        1,
        "processes serving the same sockets (auto: one per core); more than 1 needs --redis",
        metavar="N|auto",
    ),
    Option(
        "demo",
        _switch,
        None,
        "on: the demo page at / (default: on with the memory broker, off with Redis)",
        metavar="on|off",
    ),
    Option(
        "access-log",
        _switch,
        False,
        "on: log every HTTP request to the twistd log",
        metavar="on|off",
    ),
    Option(
        "log-format",
        _log_format,
        "text",
        "text: twistd's lines; json: one JSON object a line (time, level, logger, "
        "message, the event's fields)",
        metavar="text|json",
    ),
)
BY_KEY = {o.key: o for o in OPTIONS}


@dataclass(frozen=True)
class Config:
    listen: tuple[str, ...] = BY_KEY["listen"].default
    redis: tuple[RedisAddress, ...] = ()
    redis_sentinel: tuple[tuple[str, int], ...] = ()
    redis_master: tuple[str, ...] = ()
    redis_prefix: str = "pushd:"
    redis_pool_size: int = 10
    redis_timeout: float = 5.0
    node_ttl: float = 6.0
    api_key: tuple[str, ...] = ()
    metrics_key: tuple[str, ...] = ()
    metrics_allow: tuple[IPv4Network | IPv6Network, ...] = ()
    max_message_size: int = 65536
    max_batch_size: int = 1048576
    push_event_list: str = "message_gateway_event"
    history_size: int = 100
    history_ttl: int = 3600
    ping_interval: float = 30.0
    ping_timeout: float = 10.0
    token_secret: str | None = None
    token_audience: str | None = None
    token_public_key: str | None = None
    token_jwks_url: str | None = None
    auth_url: str | None = None
    auth_timeout: float = 5.0
    allowed_origin: tuple[str, ...] = ()
    personal_channel: str = "user"
    presence: tuple[str, ...] = ()
    join_leave: tuple[str, ...] = ()
    max_presence_list: int = 1000
    trusted_proxies: int = 0
    max_connections_per_ip: int = 1000
    max_subscriptions: int = 100
    publish_rate: float = 10.0
    publish_burst: int = 20
    max_send_buffer: int = 1048576
    admin_password: str | None = None
    admin_key: tuple[str, ...] = ()
    keepalive: float = 15.0
    handshake_timeout: float = 10.0
    max_header_size: int = 16384
    shutdown_timeout: float = 10.0
    workers: int = 1
    demo: bool | None = None
    access_log: bool = False
    log_format: str = "text"

    def personal(self, user: str) -> str | None:
        """The personal channel of `user`, when the id fits in a channel name."""
        channel = f"{self.personal_channel}#{user}"
        return channel if CHANNEL_RE.fullmatch(channel) else None

    @property
    def admin(self) -> bool:
        """The admin console (/admin) is on."""
        return self.admin_password is not None or bool(self.admin_key)

    @property
    def uses_redis(self) -> bool:
        return bool(self.redis) or bool(self.redis_sentinel)

    @property
    def shards(self) -> tuple[ShardAddress, ...]:
        """The Redis shards, in the order given: each `--redis`, or with
        Sentinel each `--redis-master` (db and credentials from `--redis`)."""
        if self.redis_sentinel:
            base = self.redis[0] if self.redis else RedisAddress()
            return tuple(ShardAddress(base, master) for master in self.redis_master)
        return tuple(ShardAddress(address) for address in self.redis)

    def redis_description(self) -> str:
        shards = ", ".join(where.describe() for where in self.shards) or "none"
        if self.redis_sentinel:
            sentinels = ",".join(f"{h}:{p}" for h, p in self.redis_sentinel)
            return f"{shards} of the Sentinels {sentinels}"
        return shards

    #: The values as they were given, per option: what a worker process is handed.
    given: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False)
    #: Where each given value came from, per option key (`history_size`):
    #: "command line", "env PUSHD_HISTORY_SIZE" or "config file <path>"; an
    #: option absent here has its default. Shown by `pushd check-config`.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)


def _read_ini(path: str) -> dict[str, list[str]]:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config: {path} is not UTF-8 (byte {e.start})") from None
    except configparser.Error as e:
        raise ConfigError(f"--config: {path}: {str(e).splitlines()[0]}") from None
    if not parser.has_section("pushd"):
        raise ConfigError(f"--config: {path} has no [pushd] section")
    values: dict[str, list[str]] = {}
    for name, raw in parser.items("pushd"):
        key = name.replace("-", "_")
        if key not in BY_KEY:
            raise ConfigError(f"--config: {path}: unknown option {name!r}")
        values[key] = [line.strip() for line in raw.splitlines() if line.strip()]
    return values


#: Options whose values are secrets; and those whose URLs may carry a password.
SECRET_OPTIONS = frozenset(
    ("api-key", "metrics-key", "token-secret", "admin-password", "admin-key")
)
URL_OPTIONS = frozenset(("redis", "auth-url", "token-jwks-url"))
#: How `--workers` hands a worker the secrets: JSON in its environment (readable by
#: its own user only, /proc/<pid>/environ), never on its command line (`ps`).
WORKER_SECRETS = "PUSHD_WORKER_SECRETS"


def without_password(url: str) -> str:
    """`url` without the password of its user part (`redis://:pw@h:1/2` -> `redis://h:1/2`)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    name = user.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{name}@{host}" if name else host))


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """`url` without its user part, and that part's (user, password), unquoted,
    when it has one: HTTP clients (treq, urllib) send none from a URL, and a
    URL that may be logged must not hold them. `http://u:p@h/x` ->
    (`http://h/x`, ("u", "p"))."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return bare, (unquote(parts.username or ""), unquote(parts.password or ""))


def _unsecret(option: Option, value: str, why: str) -> tuple[str, str]:
    """What an error about `value` of `option` may show of it, and of `why`:
    a secret as stars, a URL without its password (a typo in a Redis URL
    must not put its password in the journal)."""
    if option.name in SECRET_OPTIONS:
        return "'********'", why.replace(value, "********") if value else why
    if option.name in URL_OPTIONS:
        try:
            password = urlsplit(value).password
        except ValueError:
            password = None
        if password:
            hidden = value.replace(password, "***")
            return repr(hidden), why.replace(password, "***")
    return repr(value), why


def split_secrets(given: Mapping[str, tuple[str, ...]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The values of options as given, split into what a worker's command line may
    show and its secrets (option name -> value, or list for a repeatable option):
    keys and token secrets go whole to the secrets; a URL with a password shows
    without it, and the secrets hold it whole."""
    public: dict[str, Any] = {}
    secret: dict[str, Any] = {}
    for option in OPTIONS:
        values = given.get(option.key)
        if not values:
            continue
        value: Any = list(values) if option.repeatable else values[-1]
        if option.name in SECRET_OPTIONS:
            secret[option.name] = value
            continue
        if option.name in URL_OPTIONS and any(without_password(v) != v for v in values):
            secret[option.name] = value
            stripped = [without_password(v) for v in values]
            value = stripped if option.repeatable else stripped[-1]
        public[option.name] = value
    return public, secret


def _split_env(option: Option, raw: str) -> list[str]:
    return raw.split() if option.repeatable else [raw.strip()]


def load(
    command_line: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Merge the four sources. `command_line` maps option names (`history-size`) to a string, a list
    of strings (repeatable options) or None when the option was not given."""
    environ = os.environ if environ is None else environ
    handed = environ.get(WORKER_SECRETS)
    if handed:
        # A worker of --workers: the parent's secret values, which its command line lacks.
        command_line = {**command_line, **json.loads(handed)}
    config_path = command_line.get("config") or environ.get("PUSHD_CONFIG")
    from_file = _read_ini(config_path) if config_path else {}

    values: dict[str, Any] = {}
    given: dict[str, tuple[str, ...]] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        cli = command_line.get(option.name)
        if cli not in (None, [], ()):
            many = option.repeatable and not isinstance(cli, str)
            raw, where = (list(cli) if many else [cli]), "command line"
            sources[option.key] = where
        elif option.env in environ:
            raw, where = _split_env(option, environ[option.env]), option.env
            sources[option.key] = f"env {where}"
        elif option.key in from_file:
            raw, where = from_file[option.key], f"{config_path}"
            sources[option.key] = f"config file {where}"
        else:
            continue
        if not option.repeatable and len(raw) != 1:
            raise ConfigError(f"--{option.name} ({where}): expected one value")
        parsed = []
        for item in raw:
            try:
                parsed.append(option.parse(item))
            except (ValueError, TypeError) as e:
                shown, why = _unsecret(option, item, str(e))
                raise ConfigError(f"--{option.name} {shown} ({where}): {why}") from None
        values[option.key] = tuple(parsed) if option.repeatable else parsed[0]
        given[option.key] = tuple(raw)
    config = Config(**values, given=given, sources=sources)
    if bool(config.redis_sentinel) != bool(config.redis_master):
        raise ConfigError("--redis-sentinel and --redis-master go together")
    if config.redis_sentinel and len(config.redis) > 1:
        raise ConfigError(
            "with --redis-sentinel, one --redis gives db and password for every master"
        )
    try:
        check_shards(config.shards)
    except ValueError as e:
        raise ConfigError(f"--redis: {e}") from None
    if config.workers > 1 and not config.uses_redis:
        raise ConfigError("--workers: more than one worker needs --redis to coordinate through")
    return config
