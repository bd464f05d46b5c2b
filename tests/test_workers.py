"""--workers: several processes serve one port and act as one through Redis."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
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


# -- secrets never on a command line (issue 14, point 7)

API_KEY = "key-0f9e8d7c6b5a4938"
TOKEN_SECRET = "secret-1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d"
REDIS_PASSWORD = "pw-5e4d3c2b1a09f8e7"


def process_tree(pid: int) -> set[int]:
    """`pid` and every process descending from it (parents read from /proc/*/stat)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone meanwhile
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        parents[int(stat.parent.name)] = int(text.rpartition(")")[2].split()[1])
    tree, grew = {pid}, True
    while grew:
        more = {p for p, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def require_password(server: RedisServer, password: str) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"CONFIG SET requirepass %s\r\n" % password.encode())
        assert s.recv(64).startswith(b"+OK")


@pytest_twisted.ensureDeferred
async def test_workers_get_no_secret_on_their_command_line(
    own_redis: RedisServer, tmp_path: Path, prefix: str
) -> None:
    import treq
    from twisted.internet.error import ConnectError

    from tests.support import token

    require_password(own_redis, REDIS_PASSWORD)
    node = Node(
        tmp_path, "--workers", "2", "--api-key", API_KEY, "--token-secret", TOKEN_SECRET,
        "--redis", f"redis://:{REDIS_PASSWORD}@127.0.0.1:{own_redis.port}",
        "--redis-prefix", prefix,
    )  # fmt: skip
    key = {"authorization": [f"Bearer {API_KEY}"]}
    node.start()
    try:
        assert node.process is not None
        parent = node.process.pid

        async def up() -> bool:
            try:
                url = f"{node.url}/channels/ready"
                response = await treq.get(url, headers=key, persistent=False)
            except ConnectError:
                return False
            return response.code == 200

        await wait_for(up, timeout=30, what="the workers")
        await wait_for(lambda: len(children(parent)) == 2, what="two workers")
        # One worker may answer before the other has its Redis connections.
        await node.workers_ready()

        tree = process_tree(parent)
        assert children(parent) <= tree and len(tree) >= 3, tree
        for pid in tree:
            line = cmdline(pid)
            for secret in (API_KEY, TOKEN_SECRET, REDIS_PASSWORD):
                assert secret.encode() not in line, (pid, line)
        for worker in children(parent):
            line = cmdline(worker).split(b"\0")
            assert b"pushd" in line, line  # a worker, its Redis named without the password
            assert f"--redis=redis://127.0.0.1:{own_redis.port}".encode() in line, line

        # The workers got them all the same: the key, the token secret, Redis's password.
        subscribers = [
            await node.connect(f"?channel=news&token={token(None, ['news'], secret=TOKEN_SECRET)}")
            for _ in range(6)
        ]
        for client in subscribers:
            await client.next_of("subscribed")
        for n in range(4):  # over new connections: the kernel spreads them over both workers
            response = await treq.post(
                f"{node.url}/channels/news", b"%d" % n,
                headers={**key, "content-type": ["application/json"]}, persistent=False,
            )  # fmt: skip
            assert response.code == 200, await response.text()
            for client in subscribers:
                assert (await client.next_of("message"))["data"] == n
        response = await treq.post(
            f"{node.url}/channels/news", b"1",
            headers={"authorization": ["Bearer wrong"]}, persistent=False,
        )  # fmt: skip
        assert response.code == 401
        for client in subscribers:
            await client.close()
    finally:
        node.stop()
    assert REDIS_PASSWORD not in node.output() and TOKEN_SECRET not in node.output()


def test_a_worker_gets_the_parents_settings_and_secrets_off_its_command_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dataclasses

    from pushd import config as C
    from pushd.tap import Options
    from pushd.workers import secret_strings, worker_arguments, worker_secrets

    given = {
        "api-key": ["k-one", "k two"],
        "token-secret": "s3cr3t-value",
        "redis": "redis://user:p%40ss-word@127.0.0.1:6390/2",
        "auth-url": "https://app:auth-pw@app.example/pushd-auth",
        "history-size": "7",
        "allowed-origin": ["https://*.example", "http://localhost:*"],
        "workers": "2",
    }
    parent = C.load(given, environ={})
    args = worker_arguments(parent, ["INET"])
    env = worker_secrets(parent)
    assert sorted(secret_strings(parent)) == sorted(
        ["k-one", "k two", "s3cr3t-value", "p%40ss-word", "auth-pw"]
    )
    for secret in secret_strings(parent):
        assert not any(secret in arg for arg in args), args
    assert "--redis=redis://user@127.0.0.1:6390/2" in args
    assert "--auth-url=https://app@app.example/pushd-auth" in args

    for name in [n for n in os.environ if n.startswith("PUSHD_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    options = Options()
    options.parseOptions(args)
    worker = options.config
    assert worker.listen == ("systemd:domain=INET:index=0",) and worker.workers == 1
    assert dataclasses.replace(worker, listen=parent.listen, workers=parent.workers) == parent
    assert worker.redis and worker.redis[0].password == "p@ss-word"
    assert worker.api_key == ("k-one", "k two")
