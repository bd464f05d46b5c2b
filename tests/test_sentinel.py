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
