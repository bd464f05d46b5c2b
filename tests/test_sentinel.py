"""Redis Sentinel: pushd finds the master through the Sentinels and follows a failover."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
import treq

from tests.support import PushdUnderTest, RedisServer, free_port, wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("redis-sentinel") is None,
    reason="Debian's redis-sentinel is not installed (.ci/run installs it)",
)


class Sentinel:
    def __init__(self, directory: Path, master_port: int) -> None:
        self.port = free_port()
        self.config = directory / "sentinel.conf"
        self.config.write_text(
            f"port {self.port}\nbind 127.0.0.1\nsentinel resolve-hostnames no\n"
            f"sentinel monitor pushd 127.0.0.1 {master_port} 1\n"
            "sentinel down-after-milliseconds pushd 500\n"
            "sentinel failover-timeout pushd 3000\n"
        )
        self.process = subprocess.Popen(
            ["redis-sentinel", str(self.config)], stdout=subprocess.DEVNULL
        )

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, Sentinel]]:
    (tmp_path / "m").mkdir()
    (tmp_path / "r").mkdir()
    master = RedisServer(free_port(), tmp_path / "m")
    master.start()
    replica = RedisServer(free_port(), tmp_path / "r", replica_of=master.port)
    replica.start()
    sentinel = Sentinel(tmp_path, master.port)
    yield master, replica, sentinel
    sentinel.stop()
    replica.stop()
    master.stop()


@pytest_twisted.ensureDeferred
async def test_publishing_and_delivery_resume_after_a_failover(
    replicated: tuple[RedisServer, RedisServer, Sentinel],
) -> None:
    master, replica, sentinel = replicated
    pushd = PushdUnderTest.config(
        redis_sentinel=(("127.0.0.1", sentinel.port),), redis_master="pushd", redis_timeout=1
    )
    await pushd.start()
    try:
        client = await pushd.connect("?channel=news")
        await client.next_of("subscribed")
        before = await pushd.publish("news", "before")
        assert (await client.next_of("message"))["id"] == before

        master.kill()  # the Sentinel promotes the replica

        async def accepted() -> bool:
            response = await treq.post(f"{pushd.url}/channels/news", b"after", persistent=False)
            return response.code == 200

        await wait_for(accepted, timeout=30, what="publishing to resume on the new master")
        promoted = subprocess.run(
            ["redis-cli", "-p", str(sentinel.port), "SENTINEL", "get-master-addr-by-name", "pushd"],
            capture_output=True, text=True, timeout=10,
        ).stdout.split()  # fmt: skip
        assert promoted[1] == str(replica.port)
        frame = await client.next_of("message", timeout=15)
        assert frame["data"] == "after"
        assert not client.closed.called
        await client.close()
    finally:
        await pushd.stop()


@pytest_twisted.ensureDeferred
async def test_one_master_a_shard(tmp_path: Path) -> None:
    """Two masters of one Sentinel, `--redis-master a --redis-master b`: each is a
    shard, found through the Sentinel; channels of both shards work."""
    from pushd.broker.redis.sharding import shard_of
    from tests.support import channels_by_shard

    masters = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        masters.append(RedisServer(free_port(), tmp_path / name))
        masters[-1].start()
    sentinel = Sentinel(tmp_path, masters[0].port)

    def cli(*args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-p", str(sentinel.port), *args],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout

    async def monitored() -> bool:
        # The second master, monitored by the same Sentinel under its own name
        # (asked again until the Sentinel is up and has it).
        cli("SENTINEL", "MONITOR", "b", "127.0.0.1", str(masters[1].port), "1")
        return str(masters[1].port) in cli("SENTINEL", "get-master-addr-by-name", "b")

    await wait_for(monitored, what="the Sentinel to monitor b")
    pushd = PushdUnderTest.config(
        redis_sentinel=(("127.0.0.1", sentinel.port),), redis_master=("pushd", "b")
    )
    try:
        await pushd.start()
        response = await treq.get(f"{pushd.url}/health", persistent=False)
        health = await response.json()
        assert health["status"] == "ok"
        assert [s["redis"] for s in health["shards"]] == ["master pushd", "master b"]
        for shard, (channel,) in enumerate(channels_by_shard("sentinel", 2, 1)):
            assert shard_of(channel, 2) == shard
            client = await pushd.connect(f"?channel={channel}")
            await client.next_of("subscribed")
            msg_id = await pushd.publish(channel, shard)
            assert (await client.next_of("message"))["id"] == msg_id
            await client.close()
            keys = subprocess.run(
                [
                    "redis-cli",
                    "-p",
                    str(masters[shard].port),
                    "EXISTS",
                    f"pushd:{{{channel}}}:history",
                ],
                capture_output=True,
                text=True,
                timeout=10,
            )
            assert keys.stdout.strip() == "1", (shard, channel)
    finally:
        await pushd.stop()
        sentinel.stop()
        for master in masters:
            master.stop()
