"""The installed daemon: twistd finds the plugin, lists the options and serves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.application.service import IServiceMaker
from twisted.internet.error import ConnectError
from twisted.plugin import getPlugins

from tests.support import RedisServer, connect_ws, free_port, wait_for

TWISTD = str(Path(sys.executable).parent / "twistd")


def test_twistd_finds_the_plugin() -> None:
    assert "pushd" in {p.tapname for p in getPlugins(IServiceMaker)}


def test_twistd_help_lists_the_options(tmp_path: Path) -> None:
    out = subprocess.run(
        [TWISTD, "pushd", "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    ).stdout
    for option in (
        "--listen",
        "--redis",
        "--api-key",
        "--max-message-size",
        "--history-size",
        "--history-ttl",
        "--config",
    ):
        assert option in out


def run_daemon(tmp_path: Path, *extra: str) -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "pushd",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            *extra,
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PUSHD_HISTORY_SIZE": "5"},
    )
    yield port
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=30)[0].decode()
    # twistd shuts down cleanly, then exits by the signal it got (Twisted >= 21).
    assert process.returncode in (0, -signal.SIGTERM), (process.returncode, output)
    assert "Server Shut Down." in output, output
    assert "Traceback" not in output, output


@pytest.fixture
def memory_daemon(tmp_path: Path) -> Iterator[int]:
    yield from run_daemon(tmp_path)


@pytest.fixture
def redis_daemon(tmp_path: Path, redis_server: RedisServer) -> Iterator[int]:
    redis = f"redis://127.0.0.1:{redis_server.port}"
    yield from run_daemon(tmp_path, "--redis", redis, "--redis-prefix", "daemon:")


async def _serves(port: int) -> None:
    async def up() -> bool:
        try:
            response = await treq.get(f"http://127.0.0.1:{port}/", persistent=False)
        except ConnectError:
            return False
        return response.code == 200

    await wait_for(up, timeout=30, what="twistd pushd to listen")
    client = await connect_ws(port, "/ws?channel=hello")
    await client.next_of("subscribed")

    async def published() -> bool:
        response = await treq.post(
            f"http://127.0.0.1:{port}/channels/hello", b"world", persistent=False
        )
        return response.code == 200

    await wait_for(published, what="a publish to be accepted")
    assert (await client.next_of("message"))["data"] == "world"
    await client.close()


@pytest_twisted.ensureDeferred
async def test_twistd_serves_on_the_memory_broker(memory_daemon: int) -> None:
    await _serves(memory_daemon)


@pytest_twisted.ensureDeferred
async def test_twistd_serves_on_redis(redis_daemon: int) -> None:
    await _serves(redis_daemon)
