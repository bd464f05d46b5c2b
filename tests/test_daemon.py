"""The installed daemon: twistd finds the plugin, lists the options and serves."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

from tests.support import TWISTD, Node, RedisServer

OPTIONS = ("--listen", "--redis", "--api-key", "--max-message-size", "--history-size",
           "--history-ttl", "--config")  # fmt: skip


def test_twistd_finds_the_plugin() -> None:
    assert "pushd" in {p.tapname for p in getPlugins(IServiceMaker)}


def test_twistd_help_lists_the_options(tmp_path: Path) -> None:
    out = subprocess.run(
        [TWISTD, "pushd", "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    ).stdout
    for option in OPTIONS:
        assert option in out


def run(node: Node) -> Iterator[Node]:
    node.start()
    yield node
    status = node.kill(signal.SIGTERM)
    output = node.output()
    # twistd shuts down cleanly, then exits by the signal it got (Twisted >= 21).
    assert status in (0, -signal.SIGTERM), (status, output)
    assert "Server Shut Down." in output, output
    assert "Traceback" not in output, output


@pytest.fixture
def memory_daemon(tmp_path: Path) -> Iterator[Node]:
    yield from run(Node(tmp_path, env={"PUSHD_HISTORY_SIZE": "5"}))


@pytest.fixture
def redis_daemon(tmp_path: Path, redis_server: RedisServer) -> Iterator[Node]:
    redis = f"redis://127.0.0.1:{redis_server.port}"
    yield from run(Node(tmp_path, "--redis", redis, "--redis-prefix", "daemon:"))


async def _serves(node: Node) -> None:
    await node.ready()
    response = await treq.get(f"{node.url}/health", persistent=False)
    assert (await response.json())["status"] == "ok"
    client = await node.connect("?channel=hello")
    await client.next_of("subscribed")
    msg_id = await node.publish("hello", "world")
    assert await client.next_of("message") == {
        "type": "message", "channel": "hello", "id": msg_id, "data": "world"
    }  # fmt: skip
    await client.close()


@pytest_twisted.ensureDeferred
async def test_twistd_serves_on_the_memory_broker(memory_daemon: Node) -> None:
    await _serves(memory_daemon)


@pytest_twisted.ensureDeferred
async def test_twistd_serves_on_redis(redis_daemon: Node) -> None:
    await _serves(redis_daemon)


@pytest_twisted.ensureDeferred
async def test_json_log_lines(tmp_path: Path) -> None:
    """`twistd --logger=pushd.logs.json_lines`: every line is one JSON event."""
    node = Node(tmp_path, twistd=("--logger=pushd.logs.json_lines",))
    node.start()
    try:
        await node.ready()
        client = await node.connect("?channel=logged")
        await client.next_of("subscribed")
        await client.close()
    finally:
        node.kill(signal.SIGTERM)
    events = [json.loads(line) for line in node.output().splitlines()]
    admitted = [e for e in events if e["message"].startswith("websocket client 127.0.0.1 admit")]
    assert admitted and admitted[0]["peer"] == "127.0.0.1"


@pytest_twisted.ensureDeferred
async def test_the_demo_page_and_the_client_are_served(start_pushd: Any) -> None:
    pushd = await start_pushd()
    page = await treq.get(f"{pushd.url}/", persistent=False)
    client = await treq.get(f"{pushd.url}/pushd.js", persistent=False)
    assert client.code == 200
    assert client.headers.getRawHeaders("content-type")[0].startswith("text/javascript")
    assert b"export" in await client.content()
    if not pushd.cfg.redis:  # on by default with the memory broker only
        assert page.headers.getRawHeaders("content-type")[0].startswith("text/html")
    else:
        assert (await page.json())["service"] == "pushd"
    quiet = await start_pushd(demo=False)
    assert (await (await treq.get(f"{quiet.url}/", persistent=False)).json())["service"] == "pushd"
