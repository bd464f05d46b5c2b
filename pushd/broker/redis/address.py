"""Where Redis is: `RedisAddress`, `parse_redis_url` for `--redis`, `ShardAddress`
(one shard: an address, or a master the Sentinels name), and
`SentinelMaster`, the endpoint of a master the Sentinels name."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from zope.interface import implementer


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is: a TCP host and port, or a unix socket path."""

    host: str | None = None
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None

    def endpoint(self) -> str:
        """A Twisted client endpoint string."""
        if self.path is not None:
            return f"unix:{self.path}"
        host = (self.host or "localhost").replace(":", "\\:")
        return f"tcp:{host}:{self.port}"


def parse_redis_url(url: str) -> RedisAddress:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    try:
        if parts.scheme in ("redis", ""):
            if not parts.hostname:
                raise ValueError("no host")
            db = int(parts.path.lstrip("/") or query.get("db", ["0"])[0])
            return RedisAddress(
                host=parts.hostname,
                port=parts.port or 6379,
                db=db,
                username=unquote(parts.username) if parts.username else None,
                password=unquote(parts.password) if parts.password else None,
            )
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError("no socket path")
            return RedisAddress(
                path=parts.path,
                db=int(query.get("db", ["0"])[0]),
                password=unquote(parts.password) if parts.password else None,
            )
    except ValueError as e:
        raise ValueError(f"not a Redis URL ({e})") from None
    raise ValueError("expected redis://host[:port][/db] or unix:///path.sock[?db=N]")


@dataclass(frozen=True)
class ShardAddress:
    """Where a shard is: `address` (host, port or socket, db, credentials),
    or with Sentinel the master `master` of the Sentinels (then `address`
    gives only db and credentials)."""

    address: RedisAddress
    master: str | None = None

    def describe(self) -> str:
        """ "host:port" (or the socket path, or "master <name>"): no secret."""
        if self.master is not None:
            return f"master {self.master}"
        a = self.address
        where = a.path if a.path is not None else f"{a.host or 'localhost'}:{a.port}"
        return f"{where}/{a.db}" if a.db else where


def check_shards(shards: Sequence[ShardAddress]) -> None:
    """ValueError when two shards are one Redis server: the same address, or
    the same one with another db (pub/sub ignores the db, so every message
    and node command would come twice). Two names of one server (`localhost`,
    `127.0.0.1`) are only found once connected (the shards' run ids)."""
    seen: dict[tuple[str | None, int, str | None], ShardAddress] = {}
    for where in shards:
        a = where.address
        server = (where.master, 0, None) if where.master else (a.host, a.port, a.path)
        first = seen.setdefault(server, where)
        if first is not where:
            raise ValueError(
                f"the shards {first.describe()} and {where.describe()} are one Redis server "
                "(its pub/sub ignores the db: give each shard a server of its own)"
            )


@implementer(IStreamClientEndpoint)
class SentinelMaster:
    """A client endpoint that asks the Sentinels (`txredisapi.Sentinel`) where
    the master `name` is before every connection attempt, so a reconnect after
    a failover reaches the new master."""

    def __init__(self, reactor: Any, sentinel: Any, name: str) -> None:
        self._reactor = reactor
        self._sentinel = sentinel
        self._name = name

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        async def run() -> IProtocol:
            host, port = await self._sentinel.discover_master(self._name)
            endpoint = HostnameEndpoint(self._reactor, host, int(port))
            return await endpoint.connect(factory)

        return Deferred.fromCoroutine(run())
