"""TLS without a proxy: `--listen ssl:...` serves wss://, https:// and nothing in the clear.

The certificate is made here, for 127.0.0.1, and the clients trust exactly it.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

from tests.support import (
    TIMEOUT,
    Node,
    PushdUnderTest,
    WSClient,
    connect_raw,
    free_port,
    with_timeout,
)


@dataclass
class SelfSigned:
    key: Path
    cert: Path

    @property
    def trust_root(self) -> Certificate:
        return Certificate.loadPEM(self.cert.read_bytes())

    def listen(self, port: int = 0) -> str:
        """A `--listen` value serving TLS with this key and certificate."""
        return (
            f"ssl:{port}:interface=127.0.0.1"
            f":privateKey={_escape(self.key)}:certKey={_escape(self.cert)}"
        )


def _escape(path: Path) -> str:
    """A path as a value in a Twisted endpoint string (`:` and `\\` are special)."""
    return str(path).replace("\\", "\\\\").replace(":", "\\:")


@pytest.fixture
def self_signed(tmp_path: Path) -> SelfSigned:
    """A P-256 key and a self-signed certificate for CN and SAN IP 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    paths = SelfSigned(tmp_path / "key.pem", tmp_path / "cert.pem")
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths


@pytest_twisted.async_yield_fixture
async def tls_pushd(self_signed: SelfSigned) -> AsyncIterator[PushdUnderTest]:
    """pushd in-process with one listener only: TLS on a free loopback port."""
    server = PushdUnderTest.config(listen=(self_signed.listen(),))
    await server.start()
    yield server
    await server.stop()


def https(trust_root: Certificate) -> HTTPClient:
    """A treq client that trusts `trust_root` (and nothing else)."""
    policy = BrowserLikePolicyForHTTPS(trustRoot=trust_root)
    return HTTPClient(Agent(reactor, contextFactory=policy))


async def connect_wss(port: int, path: str, trust_root: Certificate) -> WSClient:
    factory = WebSocketClientFactory(f"wss://127.0.0.1:{port}{path}", reactor=reactor)
    factory.protocol = WSClient
    endpoint = wrapClientTLS(
        optionsForClientTLS("127.0.0.1", trustRoot=trust_root),
        TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=TIMEOUT),
    )
    client: WSClient = await with_timeout(endpoint.connect(factory))
    await with_timeout(client.opened)
    return client


async def publish(client: HTTPClient, port: int, channel: str, data: Any) -> str:
    response = await client.post(
        f"https://127.0.0.1:{port}/channels/{channel}",
        data=json.dumps(data).encode(),
        headers={"content-type": ["application/json"]},
    )
    body = await response.json()
    assert response.code == 200, body
    return body["id"]


@pytest_twisted.ensureDeferred
async def test_wss_subscriber_receives_an_https_publish(
    tls_pushd: PushdUnderTest, self_signed: SelfSigned
) -> None:
    port = tls_pushd.port
    client = await connect_wss(port, "/ws?channel=secure", self_signed.trust_root)
    assert await client.next() == {
        "type": "subscribed", "channel": "secure", "recovered": False, "position": None
    }  # fmt: skip

    msg_id = await publish(https(self_signed.trust_root), port, "secure", {"over": "tls"})
    assert await client.next() == {
        "type": "message", "channel": "secure", "id": msg_id, "data": {"over": "tls"}
    }  # fmt: skip
    assert await client.close() == (True, 1000, None)


@pytest_twisted.ensureDeferred
async def test_plain_http_to_the_tls_port_gets_no_http_answer(tls_pushd: PushdUnderTest) -> None:
    raw = await connect_raw(tls_pushd.port)
    raw.transport.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    # The server reads a TLS record that is not one, and hangs up: nothing HTTP comes back.
    await with_timeout(raw.lost)
    assert not raw.data.startswith(b"HTTP/"), raw.data


@pytest_twisted.async_yield_fixture
async def tls_node(tmp_path: Path, self_signed: SelfSigned) -> AsyncIterator[tuple[Node, int]]:
    """`twistd -n pushd` listening on a plain port (for `ready`) and on a TLS port."""
    tls_port = free_port()
    node = Node(tmp_path, "--listen", self_signed.listen(tls_port))
    node.start()
    yield node, tls_port
    await node.terminate()


@pytest_twisted.ensureDeferred
async def test_twistd_serves_https_from_the_command_line(
    tls_node: tuple[Node, int], self_signed: SelfSigned
) -> None:
    node, tls_port = tls_node
    await node.ready()
    response = await https(self_signed.trust_root).get(f"https://127.0.0.1:{tls_port}/health")
    assert response.code == 200
    assert (await response.json())["status"] == "ok"
    assert "Traceback" not in node.output(), node.output()
