"""--workers: several processes serve one port and act as one through Redis."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest_twisted

from tests.support import Node, RedisServer, wait_for


def children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


@pytest_twisted.ensureDeferred
async def test_two_workers_share_the_port_and_one_is_replaced_when_it_dies(
    redis_server: RedisServer, tmp_path: Path, prefix: str
) -> None:
    node = Node(
        tmp_path, "--workers", "2",
        "--redis", f"redis://127.0.0.1:{redis_server.port}", "--redis-prefix", prefix,
    )  # fmt: skip
    node.start()
    try:
        assert node.process is not None
        parent = node.process.pid
        await node.ready()
        await wait_for(lambda: len(children(parent)) == 2, what="two workers")
        workers = children(parent)

        clients = [await node.connect("?channel=all") for _ in range(20)]
        for client in clients:
            await client.next_of("subscribed")
        msg_id = await node.publish("all", "everyone")
        for client in clients:
            assert (await client.next_of("message"))["id"] == msg_id

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        await wait_for(
            lambda: len(children(parent)) == 2 and victim not in children(parent),
            what="the dead worker to be replaced",
        )
        await node.ready()
        # The kernel may have put every client on one worker: newcomers too.
        survivors = [c for c in clients if not c.closed.called]
        survivors += [await node.connect("?channel=all") for _ in range(5)]
        for client in survivors[-5:]:
            await client.next_of("subscribed")
        msg_id = await node.publish("all", "still here")
        for client in survivors:
            assert (await client.next_of("message"))["id"] == msg_id
        for client in survivors:
            await client.close()

        status = node.kill(signal.SIGTERM)
        assert status in (0, -signal.SIGTERM), node.output()
        assert not any(Path(f"/proc/{w}").exists() for w in workers - {victim})
    finally:
        node.stop()


def test_more_than_one_worker_needs_redis(tmp_path: Path) -> None:
    import subprocess

    from tests.support import TWISTD

    result = subprocess.run(
        [TWISTD, "pushd", "--workers", "2"], capture_output=True, text=True, cwd=tmp_path,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--workers" in result.stderr and "--redis" in result.stderr
