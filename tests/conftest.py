"""Fixtures: a real redis-server per session, pushd services on real ports.

txredisapi is imported inside fixtures only: importing it installs the default
reactor (library findings, 6), which must stay pytest-twisted's choice.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import LogEvent, globalLogPublisher

from pushd.broker.redis.address import RedisAddress
from tests.support import PushdUnderTest, RedisServer, free_port

_prefixes = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    if shutil.which("redis-server") is None:
        raise pytest.UsageError("redis-server is not installed (apt-get install -y redis-server)")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def more_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, ...]]:
    """Two more session redis-servers: with `redis_server`, the 3 shards of "shards"."""
    servers = tuple(RedisServer(free_port(), tmp_path_factory.mktemp("redis")) for _ in range(2))
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def shard_servers(
    redis_server: RedisServer, more_redis: tuple[RedisServer, ...]
) -> tuple[RedisServer, ...]:
    """The session's 3 redis-servers, in --redis order (`redis_server` first)."""
    return (redis_server, *more_redis)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that stop and start it."""
    server = RedisServer(free_port(), tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server that keeps every acknowledged write across a crash."""
    server = RedisServer(free_port(), tmp_path, durable=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    """A Redis key prefix of the test's own, so tests sharing a server never meet."""
    return f"t{os.getpid()}-{next(_prefixes)}:"


@pytest.fixture(params=["memory", "redis", "shards"])
def broker_kind(request: pytest.FixtureRequest) -> str:
    """memory, one Redis, or Redis with 3 shards (`shard_servers`)."""
    return request.param


@pytest.fixture
def broker_redis(
    broker_kind: str, redis_server: RedisServer, request: pytest.FixtureRequest
) -> tuple[RedisAddress, ...]:
    """The `redis=` of the test's broker: none (memory), the session Redis, or 3 shards."""
    if broker_kind == "memory":
        return ()
    if broker_kind == "redis":
        return (redis_server.address(),)
    servers: tuple[RedisServer, ...] = request.getfixturevalue("shard_servers")
    return tuple(server.address() for server in servers)


@pytest.fixture
def broker_servers(
    broker_kind: str, redis_server: RedisServer, request: pytest.FixtureRequest
) -> tuple[RedisServer, ...]:
    """The redis-servers of the test's broker, in --redis order (none on memory)."""
    if broker_kind == "memory":
        return ()
    if broker_kind == "redis":
        return (redis_server,)
    return request.getfixturevalue("shard_servers")


@pytest_twisted.async_fixture
async def pushd(start_pushd: Callable[..., Awaitable[PushdUnderTest]]) -> PushdUnderTest:
    """pushd on a free loopback port, on each broker (memory, one Redis, 3 shards)."""
    return await start_pushd()


@pytest_twisted.async_yield_fixture
async def start_pushd(
    broker_redis: tuple[RedisAddress, ...], prefix: str
) -> AsyncIterator[Callable[..., Awaitable[PushdUnderTest]]]:
    """Start pushd with options of the test's own, on each broker; stopped after."""
    started: list[PushdUnderTest] = []

    async def start(**overrides: Any) -> PushdUnderTest:
        server = PushdUnderTest.config(
            redis=broker_redis,
            redis_prefix=prefix,
            **overrides,
        )
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest_twisted.async_yield_fixture
async def redis_pushd(redis_server: RedisServer, prefix: str) -> AsyncIterator[PushdUnderTest]:
    server = PushdUnderTest.config(redis=redis_server.address(), redis_prefix=prefix)
    await server.start()
    yield server
    await server.stop()


@pytest_twisted.async_yield_fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[object]:
    """A txredisapi connection of the test's own, to look at what pushd left in Redis."""
    import txredisapi

    conn = await txredisapi.Connection("127.0.0.1", redis_server.port)
    yield conn
    await conn.disconnect()


@pytest.fixture
def log_events() -> Iterator[list[LogEvent]]:
    """Every log event emitted while the test runs."""
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)
