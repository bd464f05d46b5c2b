"""Start-up in words: every failure is one line on stderr and a non-zero exit;
a start is a banner with the version and the address, and no Twisted-speak.

Each case runs the real `twistd -n pushd` in a process of its own.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from pushd import __version__
from tests.support import TIMEOUT, TWISTD, Node, RedisServer, free_port, wait_for

#: Drops the capability that lets root bind a port below 1024 (setpriv is
#: util-linux's): root so is refused as any user is.
NO_LOW_PORTS = ("--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service")
#: Drops root's pass through file permissions: a directory's mode holds for it.
NO_OVERRIDE = (
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
)


def twistd(
    directory: Path, *options: str, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`twistd -n pushd OPTIONS` run to its end: its exit status, stdout and stderr."""
    return subprocess.run(
        [*prefix, TWISTD, "-n", "--pidfile=", "pushd", *options],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=directory,
    )


def said_in_one_line(run: subprocess.CompletedProcess[str], line: str) -> None:
    assert run.returncode != 0, run
    assert run.stderr == f"{line}\n", run.stderr
    assert "Traceback" not in run.stdout, run.stdout


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def test_a_port_in_use_is_one_line(tmp_path: Path, taken_port: int) -> None:
    where = f"tcp:{taken_port}:interface=127.0.0.1"
    run = twistd(tmp_path, "--listen", where)
    said_in_one_line(run, f"pushd: cannot listen on {where}: address already in use")


def test_a_port_in_use_by_workers_is_one_line(tmp_path: Path, taken_port: int) -> None:
    where = f"tcp:{taken_port}:interface=127.0.0.1"
    # The parent opens the sockets itself (pushd.workers); Redis is never reached.
    run = twistd(tmp_path, "--listen", where, "--workers", "2", "--redis", "redis://127.0.0.1:1")
    said_in_one_line(run, f"pushd: cannot listen on {where}: address already in use")


needs_setpriv = pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv")


@needs_setpriv
def test_a_port_below_1024_without_the_right_is_one_line(tmp_path: Path) -> None:
    where = "tcp:1023:interface=127.0.0.1"
    run = twistd(tmp_path, "--listen", where, prefix=("setpriv", *NO_LOW_PORTS))
    said_in_one_line(run, f"pushd: cannot listen on {where}: permission denied")


@needs_setpriv
def test_a_unix_socket_in_a_closed_directory_is_one_line(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o500)
    where = f"unix:{closed / 'pushd.sock'}"
    run = twistd(tmp_path, "--listen", where, prefix=("setpriv", *NO_OVERRIDE))
    said_in_one_line(run, f"pushd: cannot listen on {where}: permission denied")


def test_a_missing_key_file_is_one_line(tmp_path: Path) -> None:
    where = f"ssl:0:privateKey={tmp_path / 'missing.pem'}"
    run = twistd(tmp_path, "--listen", where)
    assert run.returncode == 2, run
    assert run.stderr == (
        f"pushd: error: --listen {where!r} (command line): "
        f"cannot read {tmp_path / 'missing.pem'}: No such file or directory\n"
    )


def test_a_file_that_is_no_key_is_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key\n")
    run = twistd(tmp_path, "--listen", f"ssl:0:privateKey={junk}")
    assert run.returncode == 2, run
    [line] = run.stderr.splitlines()
    assert line.startswith("pushd: error: --listen ") and "not a PEM private key" in line, line


@pytest.mark.parametrize("twistd_options", [(), ("-n",)])
def test_the_version(tmp_path: Path, twistd_options: tuple[str, ...]) -> None:
    run = subprocess.run(
        [TWISTD, *twistd_options, "pushd", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run
    assert run.stdout.startswith(f"pushd {__version__} (Twisted "), run.stdout


@pytest_twisted.ensureDeferred
async def test_the_banner_says_version_address_and_demo_page(tmp_path: Path) -> None:
    unix = tmp_path / "pushd.sock"
    node = Node(tmp_path, "--listen", f"unix:{unix}", "--demo", "on")
    node.start()
    try:
        await node.ready()
        url = f"http://127.0.0.1:{node.port}/"
        await wait_for(lambda: str(unix) in node.output(), timeout=TIMEOUT, what="two banners")
    finally:
        await node.terminate()
    output = node.output()
    assert f"pushd {__version__} listening on {url}" in output, output
    assert f"the demo page: {url}" in output, output
    assert f"pushd {__version__} listening on {unix}" in output, output
    for twisted_speak in ("starting on", "Starting factory", "Stopping factory", "Port", "0x"):
        assert twisted_speak not in output, (twisted_speak, output)


KINDS = ("publish connection", "command pool", "subscriber connection")


@pytest_twisted.ensureDeferred
async def test_redis_unreachable_is_said_once_per_change(tmp_path: Path) -> None:
    redis = RedisServer(free_port(), tmp_path)
    where = f"Redis 127.0.0.1:{redis.port}"
    node = Node(tmp_path, "--redis", f"redis://127.0.0.1:{redis.port}")

    def lines(text: str) -> list[str]:
        return [line for line in node.output().splitlines() if text in line]

    def said(kind: str, what: str) -> int:
        return len([line for line in lines(f"{where} {what}") if f"({kind}" in line])

    node.start()
    try:
        await wait_for(
            lambda: all(said(kind, "unreachable") for kind in KINDS),
            what="each kind of connection said unreachable",
        )
        # Not a wait for something: the window in which pushd retries (0.1 s
        # doubling to 2 s: about six attempts of each of the 12 connections),
        # each retry once a line of Twisted's, and now none.
        await deferLater(reactor, 3, lambda: None)
        for kind in KINDS:
            assert said(kind, "unreachable: connection refused; retrying") == 1, node.output()
        redis.start()
        await wait_for(lambda: all(said(kind, "connected") for kind in KINDS), what="connected")
        await node.ready()
        redis.kill()
        await wait_for(
            lambda: all(said(kind, "unreachable: connection lost; retrying") for kind in KINDS),
            what="each kind of connection said lost",
        )
        redis.start()
        await wait_for(
            lambda: all(said(kind, "connected") == 2 for kind in KINDS), what="connected again"
        )
        await node.ready()
    finally:
        await node.terminate()
        redis.stop()
    output = node.output()
    for kind in KINDS:
        assert said(kind, "unreachable") == 2, output
        assert said(kind, "connected") == 2, output
    for twisted_speak in ("Scheduling retry", "Endpoint object", "0x", "Discarding", "factory"):
        assert twisted_speak not in output, (twisted_speak, output)
