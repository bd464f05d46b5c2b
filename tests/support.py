"""Helpers for the tests: real servers, real clients, waits with deadlines."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.web.client import ResponseNeverReceived

from pushd.broker.redis.address import RedisAddress
from pushd.broker.redis.sharding import shard_of
from pushd.config import Config
from pushd.service import PushdService
from pushd.testing import start_service

TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """In a child before exec: SIGTERM when the test process goes, even
    without its teardown (a pytest-xdist worker stopped by -x, a kill)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class RedisServer:
    """A real redis-server on a loopback port, started and stopped by the tests."""

    def __init__(
        self, port: int, directory: Path, *, durable: bool = False, replica_of: int | None = None
    ) -> None:
        self.port = port
        self.directory = directory
        self.replica_of = replica_of
        # Durable: every acknowledged write is on disk before the reply (AOF, fsync always).
        self.durable = durable
        self.process: subprocess.Popen[bytes] | None = None

    def address(self) -> RedisAddress:
        return RedisAddress(host="127.0.0.1", port=self.port)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *(
                    ("--appendonly", "yes", "--appendfsync", "always")
                    if self.durable
                    else ("--appendonly", "no")
                ),
                *(("--replicaof", "127.0.0.1", str(self.replica_of)) if self.replica_of else ()),
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL: Redis vanishes without a word, as in a crash."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(TIMEOUT)
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(TIMEOUT)
            self.process = None


def server_of(channel: str, servers: Sequence[RedisServer]) -> RedisServer:
    """The redis-server a channel lives on, of pushd's shards `servers` (in --redis order)."""
    return servers[shard_of(channel, len(servers))]


def redis_options(servers: Sequence[RedisServer], prefix: str, *more: str) -> tuple[str, ...]:
    """A `twistd pushd` node's options on `servers` (each a `--redis`, a shard)
    under `prefix`, then `more`."""
    redis = [option for s in servers for option in ("--redis", f"redis://127.0.0.1:{s.port}")]
    return (*redis, "--redis-prefix", prefix, *more)


def channels_by_shard(stem: str, shards: int, per_shard: int = 1) -> list[list[str]]:
    """`per_shard` channel names `<stem>-<n>` living on each of `shards` shards."""
    found: list[list[str]] = [[] for _ in range(shards)]
    n = 0
    while any(len(names) < per_shard for names in found):
        name = f"{stem}-{n}"
        names = found[shard_of(name, shards)]
        if len(names) < per_shard:
            names.append(name)
        n += 1
    return found


async def next_turn() -> None:
    """Let the reactor finish its turn (not a wait for anything in particular)."""
    await deferLater(reactor, 0, lambda: None)


async def wait_for(predicate: Any, timeout: float = TIMEOUT, what: str = "condition") -> None:
    """Poll `predicate` (maybe async) every few ms until true; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if isinstance(result, Deferred) or hasattr(result, "__await__"):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


def with_timeout(d: Any, timeout: float = TIMEOUT) -> Deferred[Any]:
    if not isinstance(d, Deferred):
        d = Deferred.fromCoroutine(d)
    return d.addTimeout(timeout, reactor)


@dataclass
class PushdUnderTest:
    """pushd's service started in the test's own reactor on a free port."""

    cfg: Config
    service: PushdService | None = None
    port: int = 0

    @classmethod
    def config(cls, **overrides: Any) -> PushdUnderTest:
        # One Redis, or one Sentinel master, may be given alone: the first shard.
        for key, one in (("redis", RedisAddress), ("redis_master", str)):
            if isinstance(overrides.get(key), one):
                overrides[key] = (overrides[key],)
            elif key in overrides and overrides[key] is None:
                overrides[key] = ()
        base = Config(listen=("tcp:0:interface=127.0.0.1",), ping_interval=0)
        return cls(Config(**{**base.__dict__, **overrides, "given": {}}))

    async def start(self) -> None:
        # pushd.testing's start, which users' tests get too (a failed start is stopped).
        self.service, ports = await start_service(self.cfg, reactor, TIMEOUT)
        self.port = ports[0].getHost().port

    async def stop(self) -> None:
        if self.service is not None and self.service.running:
            await self.service.stopService()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def hub(self) -> Any:
        assert self.service is not None
        return self.service.hub

    async def post(self, channel: str, body: bytes | str, **kwargs: Any) -> Any:
        if isinstance(body, str):
            body = body.encode()
        from urllib.parse import quote

        if "pool" not in kwargs:  # a connection per request, unless a pool is given
            kwargs["persistent"] = False
        return await treq.post(f"{self.url}/channels/{quote(channel, safe='')}", body, **kwargs)

    async def publish(self, channel: str, data: Any, pool: Any = None) -> str:
        """POST `data` as JSON (over `pool`'s connections, when given); return
        the id of the accepted message."""
        more = {"pool": pool} if pool is not None else {}
        response = await self.post(
            channel, json.dumps(data), headers={"content-type": ["application/json"]}, **more
        )
        body = await response.json()
        assert response.code == 200, body
        return body["id"]

    async def connect(self, query: str = "", **kwargs: Any) -> WSClient:
        return await connect_ws(self.port, f"/ws{query}", **kwargs)


#: The start_pushd fixture: start pushd with config overrides on the test's broker.
StartPushd = Callable[..., Awaitable["PushdUnderTest"]]


class RawClient(Protocol):
    """Bytes in, bytes out: for requests no well-behaved client would send."""

    def __init__(self) -> None:
        self.data = b""
        self._waiting: list[tuple[bytes, int, Deferred[bytes]]] = []
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for item in [w for w in self._waiting if self.data.count(w[0]) >= w[1]]:
            self._waiting.remove(item)
            item[2].callback(self.data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)

    async def until(self, marker: bytes, timeout: float = TIMEOUT, count: int = 1) -> bytes:
        """Everything received once `marker` has arrived (`count` times)."""
        if self.data.count(marker) >= count:
            return self.data
        d: Deferred[bytes] = Deferred()
        self._waiting.append((marker, count, d))
        return await with_timeout(d, timeout)


async def connect_raw(port: int) -> RawClient:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=TIMEOUT)
    return await with_timeout(connectProtocol(endpoint, RawClient()))


class WSClient(WebSocketClientProtocol):
    """An Autobahn client that queues every frame it receives, parsed."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: DeferredQueue[Any] = DeferredQueue()
        self.opened: Deferred[None] = Deferred()
        self.closed: Deferred[tuple[bool, int | None, str | None]] = Deferred()
        self.received = 0
        self._wanted: tuple[int, Deferred[None]] | None = None

    def onOpen(self) -> None:
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received += 1
        self.frames.put(json.loads(payload))
        if self._wanted is not None and len(self.frames.pending) >= self._wanted[0]:
            waiting, self._wanted = self._wanted[1], None
            waiting.callback(None)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake failed: {code} {reason}"))
        self.closed.callback((wasClean, code, reason))

    def send(self, frame: Any) -> None:
        self.sendMessage(json.dumps(frame).encode() if not isinstance(frame, bytes) else frame)

    async def next(self, timeout: float = TIMEOUT) -> Any:
        return await with_timeout(self.frames.get(), timeout)

    async def next_many(self, n: int, kind: str, timeout: float = TIMEOUT) -> list[Any]:
        """The next `n` frames, each of type `kind`: one deadline for them all,
        where thousands of `next_of` would pay a timer each."""
        if len(self.frames.pending) < n:
            assert self._wanted is None and not self.frames.waiting
            self._wanted = (n, Deferred())
            try:
                await with_timeout(self._wanted[1], timeout)
            finally:
                self._wanted = None
        frames = self.frames.pending[:n]
        del self.frames.pending[:n]
        assert all(frame["type"] == kind for frame in frames), frames
        return frames

    async def next_of(self, kind: str, timeout: float = TIMEOUT) -> Any:
        """The next frame, which must be of type `kind`."""
        frame = await self.next(timeout)
        assert frame["type"] == kind, frame
        return frame

    async def nothing_more(self, marker_channel: str | None = None) -> None:
        """Assert no frame is waiting: a ping's pong must be the very next frame."""
        self.send({"type": "ping"})
        frame = await self.next()
        assert frame == {"type": "pong"}, frame

    async def close(self, timeout: float = TIMEOUT) -> tuple[bool, int | None, str | None]:
        if not self.closed.called:
            self.sendClose(1000)
        return await with_timeout(self.closed, timeout)


async def connect_ws(
    port: int,
    path: str,
    headers: dict[str, str] | None = None,
    client_type: type[WSClient] | None = None,
    **options: Any,
) -> Any:
    factory = WebSocketClientFactory(
        f"ws://127.0.0.1:{port}{path}", headers=headers, reactor=reactor
    )
    factory.protocol = client_type or WSClient
    factory.setProtocolOptions(**options)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=TIMEOUT)
    client: WSClient = await with_timeout(endpoint.connect(factory))
    await with_timeout(client.opened)
    return client


TWISTD = str(Path(sys.executable).parent / "twistd")


class Node:
    """`twistd -n pushd` in a process of its own, as operators run it."""

    def __init__(
        self,
        directory: Path,
        *options: str,
        env: dict[str, str] | None = None,
        twistd: tuple[str, ...] = (),
    ) -> None:
        self.directory = directory
        self.options = options
        self.twistd = twistd
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / f"pushd-{self.port}.log"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                TWISTD,
                "-n",
                "--pidfile=",
                *self.twistd,
                "pushd",
                "--listen",
                f"tcp:{self.port}:interface=127.0.0.1",
                *self.options,
            ],
            cwd=self.directory,
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    async def ready(self) -> None:
        """Serving, and (on Redis) connected: GET /channels/x answers 200, not 503."""

        async def up() -> bool:
            try:
                response = await treq.get(f"{self.url}/channels/ready", persistent=False)
            except (ConnectError, ResponseNeverReceived):
                # Not listening yet; or, on a port just freed, what still held it.
                return False
            return response.code == 200

        await wait_for(up, timeout=30, what=f"pushd on port {self.port}")

    async def workers_ready(self, workers: int = 2) -> None:
        """With --workers: every worker listening (one still starting holds the
        listening socket without accepting) and on its broker (ten health
        checks in a row, on new connections the kernel spreads, answer 200)."""
        await wait_for(
            lambda: self.output().count(f"listening on {self.url}/") >= workers,
            timeout=30,
            what="every worker to listen",
        )

        async def healthy() -> bool:
            for _ in range(10):
                response = await treq.get(f"{self.url}/health", persistent=False)
                await response.content()
                if response.code != 200:
                    return False
            return True

        await wait_for(healthy, timeout=30, what="every worker to reach its broker")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send `sig`, wait for the exit; the exit status."""
        assert self.process is not None
        self.process.send_signal(sig)
        status = self.process.wait(TIMEOUT)
        self.process = None
        return status

    def stop(self) -> None:
        if self.process is not None:
            self.kill(signal.SIGTERM)

    async def terminate(self) -> int | None:
        """SIGTERM and wait for the exit with the reactor running, so that the
        test's own clients answer pushd's goodbye (close frames, TLS close_notify)
        instead of leaving it to wait for them; the exit status."""
        process, self.process = self.process, None
        if process is None:
            return None
        process.send_signal(signal.SIGTERM)
        try:
            await wait_for(lambda: process.poll() is not None, what="pushd to exit")
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(TIMEOUT)
        return process.returncode

    def output(self) -> str:
        return self.log.read_text()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def publish(self, channel: str, data: Any) -> str:
        response = await treq.post(
            f"{self.url}/channels/{channel}",
            json.dumps(data).encode(),
            headers={"content-type": ["application/json"]},
            persistent=False,
        )
        body = await response.json()
        assert response.code == 200, body
        return body["id"]

    async def connect(self, query: str = "") -> WSClient:
        return await connect_ws(self.port, f"/ws{query}")


SECRET = "test-secret-of-at-least-32-bytes!!"


def token(
    sub: str | None = None,
    channels: list[str] | None = None,
    publish: list[str] | None = None,
    *,
    ttl: float = 3600,
    secret: str = SECRET,
    **claims: Any,
) -> str:
    """An HS256 subscriber token."""
    import jwt

    body: dict[str, Any] = {"exp": int(time.time() + ttl), **claims}
    if sub is not None:
        body["sub"] = sub
    if channels is not None:
        body["channels"] = channels
    if publish is not None:
        body["publish"] = publish
    return jwt.encode(body, secret, algorithm="HS256")


async def channel_subscriptions(redis: Any, prefix: str) -> list[str]:
    """The channels pushd holds SUBSCRIBEd in Redis, but its own control channels."""
    names = await redis.execute_command("PUBSUB", "CHANNELS", prefix + "*")
    return [n for n in names if not n[len(prefix) :].startswith("!")]
