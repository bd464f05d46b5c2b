"""Behind a proxy: etc/nginx-pushd.conf run by a real nginx in front of a real
pushd (the file's own locations, on a free port without TLS), and pushd's
once-per-process warnings about X-Forwarded-For."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectError
from twisted.logger import globalLogPublisher
from twisted.web.client import HTTPConnectionPool

from pushd.auth import ProxyWarnings
from tests.sse import open_sse
from tests.support import (
    TIMEOUT,
    Node,
    PushdUnderTest,
    WSClient,
    die_with_parent,
    free_port,
    wait_for,
    with_timeout,
)

EXAMPLE = Path(__file__).parent.parent / "etc" / "nginx-pushd.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
UNTRUSTED = "requests carry X-Forwarded-For but --trusted-proxies is 0"
LOOPBACK = "a producer request through a proxy"

pytestmark = pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")


def _once(pattern: str, replacement: str, text: str, flags: int = 0) -> str:
    """`text` with `pattern` replaced; it must match exactly once, so that a change
    to the example that this test no longer fits fails here, not quietly."""
    new, n = re.subn(pattern, replacement, text, flags=flags)
    assert n == 1, f"etc/nginx-pushd.conf: {pattern!r} matched {n} times"
    return new


def example_for_test(upstream: int, port: int) -> str:
    """etc/nginx-pushd.conf with pushd on `upstream`, serving plain HTTP on
    127.0.0.1:`port`: the port-80 redirect and the TLS settings out, every
    location as written."""
    text = EXAMPLE.read_text()
    text = _once(r"server 127\.0\.0\.1:8080;", f"server 127.0.0.1:{upstream};", text)
    text = _once(r"server \{\n    listen 80;.*?\n\}\n", "", text, re.DOTALL)
    text = _once(
        r"    listen 443 ssl http2;\n    listen \[::\]:443 ssl http2;\n",
        f"    listen 127.0.0.1:{port};\n",
        text,
    )
    return re.sub(r"\n    ssl_\w+ [^\n]*;", "", text)


class Nginx:
    """nginx in the foreground, one process (no workers: it runs as the test's
    user), its prefix, temporary files and logs in `directory`."""

    def __init__(self, directory: Path, upstream: int) -> None:
        self.directory = directory
        self.port = free_port()
        (directory / "pushd.conf").write_text(example_for_test(upstream, self.port))
        self.error_log = directory / "error.log"
        temp = "\n".join(
            f"    {kind}_temp_path {directory / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (directory / "nginx.conf").write_text(
            f"daemon off;\nmaster_process off;\nworker_processes 1;\n"
            f"pid {directory / 'nginx.pid'};\nerror_log {self.error_log} info;\n"
            "events { worker_connections 1024; }\n"
            f"http {{\n    access_log {directory / 'access.log'};\n{temp}\n"
            f"    include {directory / 'pushd.conf'};\n}}\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.directory / "nginx.conf"
        subprocess.run(
            [NGINX, "-t", "-p", str(self.directory), "-e", str(self.error_log), "-c", str(conf)],
            check=True,
            capture_output=True,
        )
        self.process = subprocess.Popen(
            [NGINX, "-p", str(self.directory), "-e", str(self.error_log), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"nginx did not start: {self.error_log.read_text()}"
                    ) from None
                time.sleep(0.01)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(TIMEOUT)
            self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """The warnings pushd logs in this process, each warned once afresh."""
    ProxyWarnings.said.clear()
    said: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") is not None and event["log_level"].name == "warn":
            said.append(event.get("log_format", ""))

    globalLogPublisher.addObserver(observe)
    yield said
    globalLogPublisher.removeObserver(observe)
    ProxyWarnings.said.clear()


async def connect_ws_from(source: str, port: int, path: str) -> WSClient:
    """A WebSocket client connecting from the loopback address `source` (127.0.0.2)."""
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}{path}", reactor=reactor)
    factory.protocol = WSClient
    endpoint = TCP4ClientEndpoint(
        reactor, "127.0.0.1", port, timeout=TIMEOUT, bindAddress=(source, 0)
    )
    client: WSClient = await with_timeout(endpoint.connect(factory))
    await with_timeout(client.opened)
    return client


async def serving(node: Node) -> None:
    """`node` answers GET /health (Node.ready's GET /channels needs the key here)."""

    async def up() -> bool:
        try:
            return (await get(f"{node.url}/health"))[0] == 200
        except ConnectError:
            return False

    await wait_for(up, timeout=30, what=f"pushd on port {node.port}")


async def get(url: str, **kwargs: Any) -> tuple[int, Any, bytes]:
    response = await treq.get(url, persistent=False, **kwargs)
    return response.code, response.headers, await response.content()


@pytest_twisted.ensureDeferred
async def test_pushd_behind_the_example_nginx(tmp_path: Path) -> None:
    node = Node(tmp_path, "--trusted-proxies", "1", "--api-key", "k", "--demo", "on")
    node.start()
    nginx = Nginx(tmp_path, node.port)
    try:
        await serving(node)
        nginx.start()

        code, headers, body = await get(f"{nginx.url}/pushd.js")
        assert code == 200, body
        assert headers.getRawHeaders("content-type") == ["text/javascript; charset=utf-8"]
        assert body == (files("pushd") / "static" / "pushd.js").read_bytes()
        code, headers, body = await get(f"{nginx.url}/")
        assert code == 200
        assert body == (files("pushd") / "static" / "index.html").read_bytes()
        # Not proxied: scraped on pushd's own port, or through nginx once configured.
        assert (await get(f"{nginx.url}/metrics"))[0] == 404
        assert (await get(f"{nginx.url}/health"))[0] == 200

        # A WebSocket upgrade and an SSE stream through nginx, from 127.0.0.2:
        # pushd sees that address (X-Forwarded-For), not nginx's 127.0.0.1.
        ws = await connect_ws_from("127.0.0.2", nginx.port, "/ws?channel=news")
        await ws.next_of("subscribed")
        sse = await open_sse(f"{nginx.url}/sse?channel=news")
        assert sse.response.code == 200
        while (await sse.next()).last_event_id != "0-0":
            pass  # up to the `subscribed` that says the stream is live
        await wait_for(
            lambda: "websocket client 127.0.0.2 admitted" in node.output(),
            what="pushd to log the WebSocket client's own address",
        )

        # A publish through nginx; both subscribers get it as it happens (an SSE
        # stream nginx buffered would hold the event back).
        response = await treq.post(
            f"{nginx.url}/channels/news",
            json.dumps({"n": 1}).encode(),
            headers={"content-type": ["application/json"], "authorization": ["Bearer k"]},
            persistent=False,
        )
        published = await response.json()
        assert response.code == 200, published
        message = await ws.next_of("message")
        assert (message["id"], message["data"]) == (published["id"], {"n": 1})
        event = await sse.next()
        assert (event.type, event.last_event_id) == ("message", published["id"])
        assert json.loads(event.data)["data"] == {"n": 1}

        await ws.close()
        sse.close()
        # Set up as the example says: no warning about the proxy.
        assert UNTRUSTED not in node.output() and LOOPBACK not in node.output()
    finally:
        nginx.stop()
        node.stop()


@pytest_twisted.ensureDeferred
async def test_untrusted_proxy_and_loopback_producers_are_warned_once(tmp_path: Path) -> None:
    # --trusted-proxies 0 and no --api-key behind nginx: the two mistakes.
    node = Node(tmp_path)
    node.start()
    nginx = Nginx(tmp_path, node.port)
    try:
        await node.ready()
        nginx.start()
        clients = [await connect_ws_from("127.0.0.2", nginx.port, "/ws?channel=c")]
        for _ in range(3):
            response = await treq.post(f"{nginx.url}/channels/c", b"x", persistent=False)
            assert response.code == 200  # admitted as loopback: nginx's address
            await response.content()
            clients.append(await connect_ws_from("127.0.0.2", nginx.port, "/ws?channel=c"))
        for client in clients:
            await client.next_of("subscribed")
        await wait_for(lambda: LOOPBACK in node.output(), what="the loopback warning")
        log = node.output()
        assert log.count(UNTRUSTED) == 1, log
        assert log.count(LOOPBACK) == 1, log
        assert "through it ANYONE may publish" in log
        assert "websocket client 127.0.0.1 admitted" in log  # every client looks like nginx
        for client in clients:
            await client.close()
    finally:
        nginx.stop()
        node.stop()


@pytest_twisted.ensureDeferred
async def test_the_hot_path_sees_x_forwarded_for(tmp_path: Path, warnings: list[str]) -> None:
    # Keep-alive POSTs with a key, which pushd answers without twisted.web.
    server = PushdUnderTest.config(api_key=("k",))
    await server.start()
    nginx = Nginx(tmp_path, server.port)
    try:
        nginx.start()
        assert server.service is not None
        fast = server.service.site.fast
        pool = HTTPConnectionPool(reactor, persistent=True)
        for _ in range(3):
            response = await treq.post(
                f"{nginx.url}/channels/c", b"x", headers={"authorization": ["Bearer k"]}, pool=pool
            )
            assert response.code == 200
            await response.content()
        await pool.closeCachedConnections()
        assert fast.taken == 3
        assert [w for w in warnings if UNTRUSTED in w] == [
            f"{UNTRUSTED}: every client looks like the proxy; set --trusted-proxies 1 "
            "behind one proxy"
        ]
        assert not [w for w in warnings if LOOPBACK in w]  # a key was required
    finally:
        nginx.stop()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_no_warning_without_a_proxy(warnings: list[str]) -> None:
    server = PushdUnderTest.config()
    await server.start()
    try:
        await server.publish("c", 1)
        client = await server.connect("?channel=c")
        await client.next_of("subscribed")
        await client.close()
        assert not [w for w in warnings if UNTRUSTED in w or LOOPBACK in w]
    finally:
        await server.stop()


def test_the_systemd_unit_outwaits_a_graceful_stop() -> None:
    # etc/pushd.service's stop must outlast pushd's own (--shutdown-timeout, in
    # etc/pushd.ini or its default), or systemd kills pushd mid-goodbye.
    from configparser import ConfigParser

    from pushd.config import BY_KEY

    unit = ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string(EXAMPLE.with_name("pushd.service").read_text())
    service = unit["Service"]
    ini = ConfigParser(interpolation=None)
    ini.read_string(EXAMPLE.with_name("pushd.ini").read_text())
    shutdown = float(ini["pushd"].get("shutdown-timeout", BY_KEY["shutdown_timeout"].default))
    assert float(service["TimeoutStopSec"].removesuffix("s")) > shutdown
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    assert int(service["LimitNOFILE"]) >= 65536
    assert service["User"] == "pushd"
    argv = service["ExecStart"].split()
    assert argv[argv.index("pushd") :] == ["pushd", "--config", "/etc/pushd/pushd.ini"]
    assert "--nodaemon" in argv and "--pidfile=" in argv


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_reads_the_unit_without_complaint() -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(EXAMPLE.with_name("pushd.service"))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # systemd ignores what it cannot parse with a warning and exit status 0.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest_twisted.ensureDeferred
async def test_a_loopback_producer_named_by_the_proxy_is_warned_once(warnings: list[str]) -> None:
    # --trusted-proxies 1, no --api-key: the proxy's word makes a producer local.
    server = PushdUnderTest.config(trusted_proxies=1)
    await server.start()
    try:
        for client in ("127.0.0.1", "127.0.0.1", "198.51.100.7"):
            response = await server.post("c", "x", headers={"x-forwarded-for": [client]})
            await response.content()
            assert response.code == (200 if client.startswith("127.") else 403)
        said = [w for w in warnings if LOOPBACK in w]
        assert len(said) == 1, warnings
        assert "the proxies' header is all that vouches for it; set --api-key" in said[0]
        assert not [w for w in warnings if UNTRUSTED in w]
    finally:
        await server.stop()
