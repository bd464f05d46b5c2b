"""RS256 and ES256 subscriber tokens: a PEM public key file and a JWKS URL.

Keys are made in the tests (cryptography); the JWKS is served over real HTTP by
a twisted.web server in the test's reactor, so a fetch made on the reactor
thread would deadlock (the server could never answer): every JWKS test that
passes shows the fetch ran in a thread.
"""

from __future__ import annotations

import base64
import hmac
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
import treq
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from pushd.auth import AuthError, Grants, TokenVerifier
from pushd.config import ConfigError, load
from pushd.token_keys import JwksKeys, read_public_key
from tests.sse import open_sse
from tests.support import (
    SECRET,
    TWISTD,
    Node,
    PushdUnderTest,
    connect_ws,
    free_port,
    token,
    wait_for,
    with_timeout,
)

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
KEYS = {"RS256": RSA_KEY, "ES256": EC_KEY}


def pem(private_key: Any) -> bytes:
    data: bytes = private_key.public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    )
    return data


def signed(
    private_key: Any, algorithm: str, kid: str | None = None, ttl: float = 3600, **claims: Any
) -> str:
    body = {"exp": int(time.time() + ttl), "sub": "alice", "channels": ["news"], **claims}
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(body, private_key, algorithm=algorithm, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], secret: bytes | None = None) -> str:
    """A token PyJWT would not make: `alg: none`, or HS256 keyed with a public key."""
    claims = {"exp": int(time.time()) + 3600, "channels": ["*"]}
    signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = b"" if secret is None else hmac.new(secret, signing.encode(), "sha256").digest()
    return f"{signing}.{b64(signature)}"


def refusal(verifier: TokenVerifier, tok: str) -> tuple[int, str, str]:
    with pytest.raises(AuthError) as e:
        verifier.verify(tok)
    return e.value.status, e.value.code, e.value.message


@pytest.fixture
def key_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for algorithm, key in KEYS.items():
        files[algorithm] = tmp_path / f"{algorithm}.pem"
        files[algorithm].write_bytes(pem(key))
    return files


# --- a public key file -------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_a_key_file_verifies_its_algorithm(algorithm: str, key_files: dict[str, Path]) -> None:
    public_key = read_public_key(str(key_files[algorithm]))
    assert public_key.algorithm == algorithm
    verifier = TokenVerifier(public_key=public_key)
    grants = verifier.verify(signed(KEYS[algorithm], algorithm, publish=["chat"]))
    assert isinstance(grants, Grants)
    assert (grants.sub, grants.channels, grants.publish) == ("alice", ("news",), ("chat",))
    assert grants.expires is not None and grants.expires > time.time()


def test_the_algorithm_follows_the_key_not_the_token(key_files: dict[str, Path]) -> None:
    verifier = TokenVerifier(public_key=read_public_key(str(key_files["RS256"])))
    public_pem = key_files["RS256"].read_bytes()
    for tok in (
        forged({"alg": "none", "typ": "JWT"}),
        # The classic confusion: HS256 "signed" with the public key as its secret.
        forged({"alg": "HS256", "typ": "JWT"}, secret=public_pem),
        signed(EC_KEY, "ES256"),
        signed(RSA_KEY, "RS384"),
    ):
        status, code, message = refusal(verifier, tok)
        assert (status, code) == (401, "bad_token"), message
        assert "alg" in message, message
    status, code, _ = refusal(verifier, signed(OTHER_RSA_KEY, "RS256"))
    assert (status, code) == (401, "bad_token")
    assert refusal(verifier, signed(RSA_KEY, "RS256", ttl=-10))[:2] == (401, "token_expired")
    assert refusal(verifier, "not-a-token")[:2] == (401, "bad_token")


def test_audience_and_a_secret_beside_the_key(key_files: dict[str, Path]) -> None:
    verifier = TokenVerifier(SECRET, "pushd", public_key=read_public_key(str(key_files["ES256"])))
    assert refusal(verifier, signed(EC_KEY, "ES256"))[:2] == (401, "bad_token")  # no aud
    grants = verifier.verify(signed(EC_KEY, "ES256", aud="pushd"))
    assert isinstance(grants, Grants) and grants.sub == "alice"
    # While moving from HS256 to ES256, both kinds of token are taken.
    grants = verifier.verify(token("bob", ["news"], aud="pushd"))
    assert isinstance(grants, Grants) and grants.sub == "bob"


def _start_error(options: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        load(options, {})
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_bad_key_file_is_one_line_at_start_up(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    assert _start_error({"token-public-key": str(missing)}) == (
        f"--token-public-key {str(missing)!r} (command line): "
        f"cannot read {missing}: No such file or directory"
    )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    assert "not a PEM public key" in _start_error({"token-public-key": str(garbage)})
    private = tmp_path / "private.pem"
    private.write_bytes(RSA_KEY.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    assert "not a PEM public key" in _start_error({"token-public-key": str(private)})
    p384 = tmp_path / "p384.pem"
    p384.write_bytes(pem(ec.generate_private_key(ec.SECP384R1())))
    assert "must be on P-256 (ES256), not secp384r1" in _start_error(
        {"token-public-key": str(p384)}
    )
    edwards = tmp_path / "ed25519.pem"
    edwards.write_bytes(pem(ed25519.Ed25519PrivateKey.generate()))
    assert "neither RSA (RS256) nor EC P-256" in _start_error({"token-public-key": str(edwards)})
    assert "expected an http:// or https:// URL" in _start_error(
        {"token-jwks-url": "file:///etc/passwd"}
    )


def test_twistd_refuses_a_bad_key_file_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "pushd", "--token-public-key", "nope.pem"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pushd: error: --token-public-key 'nope.pem' (command line): "
        "cannot read nope.pem: No such file or directory"
    ]


# --- a JWKS URL --------------------------------------------------------------


def jwk(private_key: Any, kid: str) -> dict[str, Any]:
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    return {**data, "kid": kid, "use": "sig"}


class JwksServer(Resource):
    """A JWKS endpoint on a loopback port: `keys` as served, `requests` counted."""

    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)
        self.keys: list[dict[str, Any]] = []
        self.requests = 0
        self.port: Any = None

        #: While set, requests wait in `held` until `release`.
        self.hold = False
        self.held: list[Request] = []

    def render_GET(self, request: Request) -> Any:
        self.requests += 1
        request.setHeader(b"content-type", b"application/json")
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        return json.dumps({"keys": self.keys}).encode()

    def release(self) -> None:
        self.hold = False
        held, self.held = self.held, []
        for request in held:
            request.write(json.dumps({"keys": self.keys}).encode())
            request.finish()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}/.well-known/jwks.json"


@pytest_twisted.async_yield_fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    server.keys = [jwk(RSA_KEY, "rsa-1"), jwk(EC_KEY, "ec-1")]
    server.port = reactor.listenTCP(0, Site(server), interface="127.0.0.1")
    yield server
    await server.port.stopListening()


async def verified(result: Any) -> Grants:
    if isinstance(result, Deferred):
        result = await with_timeout(result)
    assert isinstance(result, Grants)
    return result


async def refused(verifier: TokenVerifier, tok: str) -> AuthError:
    try:
        result = verifier.verify(tok)
        if isinstance(result, Deferred):
            await with_timeout(result)
    except AuthError as e:
        return e
    raise AssertionError("the token was accepted")


@pytest.fixture
def clock() -> Clock:
    """The JWKS cache's time, moved by hand; the fetches themselves are real."""
    clock = Clock()
    clock.advance(1000)
    return clock


@pytest_twisted.ensureDeferred
async def test_jwks_fetched_once_then_cached(jwks_server: JwksServer, clock: Clock) -> None:
    keys = JwksKeys(jwks_server.url, reactor, clock=clock)
    verifier = TokenVerifier(jwks=keys)
    first = verifier.verify(signed(RSA_KEY, "RS256", "rsa-1"))
    assert isinstance(first, Deferred)  # the keys are being fetched
    assert (await verified(first)).sub == "alice"
    # Known kids verify at once, on the reactor thread, with no fetch.
    for kid, algorithm in (("rsa-1", "RS256"), ("ec-1", "ES256")):
        grants = verifier.verify(signed(KEYS[algorithm], algorithm, kid))
        assert isinstance(grants, Grants)
    assert jwks_server.requests == keys.fetches == 1
    # A kid's key pins its algorithm.
    error = await refused(verifier, signed(EC_KEY, "ES256", "rsa-1"))
    assert error.code == "bad_token" and "alg" in error.message


@pytest_twisted.ensureDeferred
async def test_jwks_key_rotation_and_unknown_kids(jwks_server: JwksServer, clock: Clock) -> None:
    keys = JwksKeys(jwks_server.url, reactor, clock=clock, refresh_interval=30)
    verifier = TokenVerifier(jwks=keys)
    await verified(verifier.verify(signed(RSA_KEY, "RS256", "rsa-1")))
    assert jwks_server.requests == 1

    # A stranger's made-up kids: within 30 s of the last fetch, refused without one.
    for n in range(5):
        error = await refused(verifier, signed(OTHER_RSA_KEY, "RS256", f"random-{n}"))
        assert (error.status, error.code) == (401, "bad_token")
        assert f"no key 'random-{n}' in the JWKS" in error.message
    assert jwks_server.requests == 1

    # The issuer rotates: a new key, the old one gone.
    jwks_server.keys = [jwk(OTHER_RSA_KEY, "rsa-2")]
    clock.advance(30)
    rotated = verifier.verify(signed(OTHER_RSA_KEY, "RS256", "rsa-2"))
    assert isinstance(rotated, Deferred)  # an unknown kid: the set is fetched again
    assert (await verified(rotated)).sub == "alice"
    assert jwks_server.requests == 2
    error = await refused(verifier, signed(RSA_KEY, "RS256", "rsa-1"))
    assert "no key 'rsa-1' in the JWKS" in error.message
    assert jwks_server.requests == 2  # within 30 s of that fetch

    # After the interval an unknown kid may fetch once more; it is still refused.
    clock.advance(30)
    error = await refused(verifier, signed(RSA_KEY, "RS256", "random-x"))
    assert error.code == "bad_token"
    assert jwks_server.requests == 3


@pytest_twisted.ensureDeferred
async def test_jwks_refreshed_in_the_background(jwks_server: JwksServer, clock: Clock) -> None:
    keys = JwksKeys(jwks_server.url, reactor, clock=clock, lifespan=300)
    verifier = TokenVerifier(jwks=keys)
    await verified(verifier.verify(signed(RSA_KEY, "RS256", "rsa-1")))
    clock.advance(300)
    # Old keys serve while the set is fetched again.
    assert isinstance(verifier.verify(signed(RSA_KEY, "RS256", "rsa-1")), Grants)
    await wait_for(lambda: jwks_server.requests == 2, what="the background fetch")


@pytest_twisted.ensureDeferred
async def test_jwks_unreachable_is_503_and_bounded(clock: Clock) -> None:
    url = f"http://127.0.0.1:{free_port()}/jwks.json"  # nothing listens
    keys = JwksKeys(url, reactor, clock=clock, refresh_interval=30)
    verifier = TokenVerifier(jwks=keys)
    tok = signed(RSA_KEY, "RS256", "rsa-1")
    error = await refused(verifier, tok)
    assert (error.status, error.code) == (503, "auth_unavailable"), error.message
    assert "\n" not in error.message
    error = await refused(verifier, tok)
    assert error.status == 503
    assert keys.fetches == 1


@pytest_twisted.ensureDeferred
async def test_jwks_keys_of_other_algorithms_and_tokens_without_kid(
    jwks_server: JwksServer, clock: Clock
) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    jwks_server.keys.append(jwk(p384, "ec-384"))
    verifier = TokenVerifier(jwks=JwksKeys(jwks_server.url, reactor, clock=clock))
    error = await refused(verifier, signed(p384, "ES384", "ec-384"))
    assert "is ES384, not one of RS256, ES256" in error.message
    error = await refused(verifier, signed(RSA_KEY, "RS256"))
    assert "no 'kid'" in error.message


# --- through a real pushd ----------------------------------------------------


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Any]:
    nodes: list[Node] = []

    def make(*options: str) -> Node:
        node = Node(tmp_path, *options)
        nodes.append(node)
        node.start()
        return node

    yield make
    for node in nodes:
        node.stop()


async def next_message(ws: Any) -> Any:
    """The next message frame, past the `subscribed` ones (the personal channel's too)."""
    while True:
        frame = await ws.next()
        if frame["type"] != "subscribed":
            assert frame["type"] == "message", frame
            return frame


async def sse_status(node: Node, query: str) -> int:
    response = await treq.get(f"{node.url}/sse?{query}", persistent=False)
    await response.content()
    code: int = response.code
    return code


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
@pytest_twisted.ensureDeferred
async def test_websocket_and_sse_with_a_key_file(
    algorithm: str, key_files: dict[str, Path], node_factory: Any
) -> None:
    node = node_factory("--token-public-key", str(key_files[algorithm]))
    await node.ready()
    tok = signed(KEYS[algorithm], algorithm)
    ws = await node.connect(f"?channel=news&token={tok}")
    assert (await ws.next_of("subscribed"))["channel"] == "news"
    stream = await open_sse(f"{node.url}/sse?channel=news&token={tok}")
    assert stream.response.code == 200
    assert (await stream.next()).type == "subscribed"
    await node.publish("news", {"n": 1})
    assert (await next_message(ws))["data"] == {"n": 1}
    while (event := await stream.next()).type == "subscribed":
        pass
    assert json.loads(event.data)["data"] == {"n": 1}
    stream.close()
    await ws.close()
    assert await sse_status(node, f"channel=news&token={token('a', ['news'])}") == 401
    other = signed(OTHER_RSA_KEY if algorithm == "RS256" else RSA_KEY, "RS256")
    assert await sse_status(node, f"channel=news&token={other}") == 401


@pytest_twisted.ensureDeferred
async def test_a_jwks_through_a_real_pushd(jwks_server: JwksServer, node_factory: Any) -> None:
    node = node_factory("--token-jwks-url", jwks_server.url, "--api-key", "backend-key")

    async def healthy() -> bool:
        try:
            response = await treq.get(f"{node.url}/health", persistent=False)
        except ConnectError:
            return False
        await response.content()
        return response.code == 200

    await wait_for(healthy, timeout=30, what="pushd to serve")
    await wait_for(lambda: jwks_server.requests == 1, what="pushd's first fetch at start-up")
    for kid, algorithm in (("rsa-1", "RS256"), ("ec-1", "ES256")):
        tok = signed(KEYS[algorithm], algorithm, kid, publish=["news"])
        ws = await node.connect(f"?channel=news&token={tok}")
        assert (await ws.next_of("subscribed"))["channel"] == "news"
        # A browser's publish with the same token (verified off the request's turn).
        response = await treq.post(
            f"{node.url}/channels/news",
            b"from a page",
            headers={"Authorization": [f"Bearer {tok}"]},
            persistent=False,
        )
        assert response.code == 200, await response.text()
        assert (await next_message(ws))["data"] == "from a page"
        await ws.close()
    stranger = signed(OTHER_RSA_KEY, "RS256", "made-up")
    assert await sse_status(node, f"channel=news&token={stranger}") == 401
    response = await treq.post(
        f"{node.url}/channels/news",
        b"x",
        headers={"Authorization": [f"Bearer {stranger}"]},
        persistent=False,
    )
    assert response.code == 401
    assert (await response.json())["error"] == "bad_token"
    assert jwks_server.requests == 1  # the made-up kids came within 30 s of the first fetch


def test_jwks_secret_in_the_url_is_masked_for_workers() -> None:
    from pushd.config import split_secrets

    public, secret = split_secrets({"token_jwks_url": ("https://u:pw@idp.example/jwks",)})
    assert public == {"token-jwks-url": "https://u@idp.example/jwks"}
    assert secret == {"token-jwks-url": "https://u:pw@idp.example/jwks"}


@pytest_twisted.ensureDeferred
async def test_clients_wait_for_the_first_jwks_fetch(jwks_server: JwksServer) -> None:
    """A WebSocket connect and a browser's publish that come while the keys are
    being fetched wait for that one fetch (the async paths of both callers)."""
    jwks_server.hold = True
    server = PushdUnderTest.config(token_jwks_url=jwks_server.url, api_key=("backend-key",))
    await server.start()
    try:
        verifier = server.service.site.ws_factory.gate.authenticator.verifier
        keys = verifier.jwks
        await wait_for(lambda: len(jwks_server.held) == 1, what="the fetch at start-up")
        tok = signed(EC_KEY, "ES256", "ec-1", publish=["news"])
        connecting = Deferred.fromCoroutine(
            connect_ws(server.port, f"/ws?channel=news&token={tok}")
        )
        posting = treq.post(
            f"{server.url}/channels/news",
            b"from a page",
            headers={"Authorization": [f"Bearer {tok}"]},
            persistent=False,
        )
        answered: list[str] = []
        connecting.addBoth(lambda r: answered.append("ws") or r)
        posting.addBoth(lambda r: answered.append("post") or r)
        # The start-up fetch's own waiter, the connect's and the publish's.
        await wait_for(lambda: keys.waiters == 3, what="both clients to wait for the keys")
        assert answered == []
        jwks_server.release()
        ws = await with_timeout(connecting)
        response = await with_timeout(posting)
        assert response.code == 200, await response.text()
        posted = json.loads(await response.text())["id"]
        subscribed = await ws.next()
        assert subscribed["type"] == "subscribed", subscribed
        # Published while the subscription was being made: before its cut
        # (`position`, the contract), or delivered after `subscribed`.
        if subscribed["position"] != posted:
            assert (await next_message(ws))["data"] == "from a page"
        response = await server.post(
            "news", b"after", headers={"Authorization": ["Bearer backend-key"]}
        )
        live = json.loads(await response.text())["id"]
        assert (await next_message(ws))["id"] == live
        await ws.close()
        assert jwks_server.requests == 1
    finally:
        await server.stop()
