"""The operator's kit (issue 18) and the admin console (issue 19), tried from
outside by a newcomer: real redis-servers, real `twistd -n pushd` processes,
the installed `pushd` command, real HTTP clients.

Defects found this way, each now fixed (the tests say how they looked):

- test_check_token_of_a_long_lived_token_is_one_line: `pushd token --ttl
  99999999999d` makes a token; `pushd check-token` of it prints `valid` and
  then a Python traceback (ValueError: year ... is out of range; an `exp` of
  10**20 gives OverflowError).
- test_a_bad_redis_url_error_hides_its_password: `pushd check-config` (and
  `twistd -n pushd`) with `--redis redis://:PASSWORD@host:notaport` (or in
  PUSHD_REDIS) prints the password in clear in its one-line error, on stderr
  and so in the journal; everywhere else the URL shows without it.
- test_admin_event_stream_ends_when_its_cookie_expires: a page's
  `/admin/api/events` stream keeps pushing the whole cluster's view after its
  login cookie expired (and after logout): only the start of the stream is
  checked.
- test_a_trickling_jwks_url_refuses_token_clients: a JWKS URL that answers
  but sends its body a byte every second never times out (the 10 s timeout is
  per read): every token client hangs forever instead of getting the
  documented `503 auth_unavailable`, and nothing is logged.
- test_check_token_with_a_trickling_jwks_url_ends: `pushd check-token
  --token-jwks-url` against such a URL never returns.
- test_login_cookie_is_secure_behind_a_tls_proxy: behind a TLS proxy (what the
  README advises for /admin), with `--trusted-proxies 1` and
  `X-Forwarded-Proto: https`, the login cookie has no `Secure`, so the browser
  also sends it over plain http.
- test_a_frozen_redis_is_said_in_words_not_tracebacks: Redis frozen (SIGSTOP)
  while a publish is in flight: the log gets a run of critical `Unhandled
  error in Deferred` tracebacks (OutcomeUnknown: Redis connection lost), and
  state lines `set-up failed: (1.0, 'Deferred')` / `Redis refused AUTH: Not
  received Redis response` instead of words.
- test_a_config_file_not_in_utf8_is_one_line: a --config file with one
  Latin-1 byte (`# café`) gives a UnicodeDecodeError traceback from
  `pushd check-config` and from `twistd -n pushd`.
- test_the_console_disconnects_an_auth0_user: a token user pushd admits
  (`auth0|5f7c...`, the ids of Auth0, whose JWKS --token-jwks-url is for)
  cannot be disconnected from the console: 400 bad_user.
- test_an_auth_url_with_credentials_admits_clients: `--auth-url
  http://user:secret@app/auth` (a password the README masks as a normal
  thing) refuses every client 403 without asking the application ("invalid
  hostname: user:@127.0.0.1").
- test_loopback_through_a_dual_stack_listener: on `--listen
  'tcp6:PORT:interface=\\:\\:'` (IPv4 and IPv6), a client on 127.0.0.1 shows as
  ::ffff:127.0.0.1 and is not loopback: /metrics and the key-less producer
  API answer 403 to the machine's own backend and Prometheus.
- test_a_stats_key_of_another_type_is_said: `<prefix>!stats` of another type
  (a string): every node's console shows itself alone, `"partial": true`,
  with Redis up and not a word in the log.
- test_a_jwks_url_password_is_not_sent_to_clients: `--token-jwks-url
  http://user:SECRET@idp/...` (check-config masks that password) never
  fetches (credentials not understood), and every token client, anyone,
  gets the URL with its password in the 503 `auth_unavailable` body; the
  text log shows it too.

Passing, checking something new: the CSRF rule against odd origins and
bodies, the metrics key kept apart from producer keys, a killed node leaving
the console's view within 10 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
import treq
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import reactor
from twisted.internet.task import LoopingCall
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from tests.support import Node, RedisServer, connect_raw, wait_for, with_timeout

PUSHD = str(Path(sys.executable).parent / "pushd")
PASSWORD = "newcomer-five-admin-password"
ACTION = {"x-pushd-admin": ["1"]}


def clean_env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHD_")}
    return {**env, **more}


async def pushd_command(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, str, str]:
    out, err, code = await with_timeout(
        getProcessOutputAndValue(PUSHD, list(argv), env=env or clean_env()), timeout
    )
    return code, out.decode(), err.decode()


def cookie_for(password: str, expiry: int) -> str:
    """A login cookie as the README defines it: `<expiry>.<hex HMAC-SHA256 of it
    under HMAC-SHA256(password, "pushd admin cookie v1")>`."""
    key = hmac.new(password.encode(), b"pushd admin cookie v1", hashlib.sha256).digest()
    mac = hmac.new(key, str(expiry).encode(), hashlib.sha256).hexdigest()
    return f"{expiry}.{mac}"


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Node]]:
    started: list[Node] = []
    yield started
    for node in started:
        node.stop()


def start(nodes: list[Node], tmp_path: Path, *options: str, **kw: Any) -> Node:
    node = Node(tmp_path, *options, env=clean_env(**kw.pop("env", {})), **kw)
    node.start()
    nodes.append(node)
    return node


# --- pushd check-token ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_check_token_of_a_long_lived_token_is_one_line() -> None:
    """An operator makes a token "that never expires" with `pushd token --ttl
    99999999999d` (accepted) and checks it: `check-token` says `valid`, then
    dies with a traceback. Expected: the claims with the expiry (or a one-line
    `invalid: ...`), never a traceback."""
    secret = "a-secret-of-the-newcomer-five-tests!!"
    env = clean_env(PUSHD_TOKEN_SECRET=secret)
    code, tok, err = await pushd_command(
        "token", "--sub", "alice", "--ttl", "99999999999d", env=env
    )
    assert code == 0, err
    code, out, err = await pushd_command("check-token", tok.strip(), env=env)
    assert "Traceback" not in err, err
    assert code in (0, 1) and out.strip(), (code, out, err)

    far = jwt.encode({"sub": "bob", "exp": 10**20}, secret, algorithm="HS256")
    code, out, err = await pushd_command("check-token", far, env=env)
    assert "Traceback" not in err, err
    assert code in (0, 1) and out.strip(), (code, out, err)


# --- secrets in start-up errors ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_bad_redis_url_error_hides_its_password(tmp_path: Path, nodes: list[Node]) -> None:
    """A typo in the port of a Redis URL with a password: the one-line error
    shows the password in clear, on stderr (the journal), from the command
    line and from PUSHD_REDIS alike. Expected: the URL without its password,
    as check-config and the logs show it everywhere else."""
    secret = "s3cret-redis-pw-of-newcomer-5"
    url = f"redis://:{secret}@127.0.0.1:notaport"
    code, out, err = await pushd_command("check-config", "--redis", url)
    assert code == 2, (out, err)
    assert secret not in out + err, err

    code, out, err = await pushd_command("check-config", env=clean_env(PUSHD_REDIS=url))
    assert code == 2, (out, err)
    assert secret not in out + err, err

    node = start(nodes, tmp_path, env={"PUSHD_REDIS": url})
    assert node.process is not None
    await wait_for(lambda: node.process.poll() is not None, timeout=30, what="pushd to stop")
    nodes.remove(node)
    output = node.output()
    assert "error" in output, output
    assert secret not in output, output


# --- the admin console ---------------------------------------------------------------


async def request(
    node: Node, method: str, path: str, body: bytes | None = None, **headers: Any
) -> tuple[int, Any, bytes]:
    sent = {k.replace("_", "-"): v if isinstance(v, list) else [v] for k, v in headers.items()}
    response = await treq.request(
        method, f"{node.url}{path}", data=body, headers=sent, persistent=False
    )
    return response.code, response.headers, await response.content()


async def admin_node(nodes: list[Node], tmp_path: Path, *options: str) -> Node:
    node = start(nodes, tmp_path, "--admin-password", PASSWORD, *options)
    await node.ready()
    return node


@pytest_twisted.ensureDeferred
async def test_admin_event_stream_ends_when_its_cookie_expires(
    tmp_path: Path, nodes: list[Node]
) -> None:
    """A page logged in with a cookie that expires (here in 2 s) keeps its
    `/admin/api/events` stream: the cluster's view goes on arriving every
    second, long after every API call with that cookie answers 401 (the same
    after logout, which only clears the browser's copy). Expected: the stream
    ends when the cookie expires, as a subscriber's stream ends at its
    token's `exp`."""
    node = await admin_node(nodes, tmp_path)
    expiry = int(time.time()) + 2
    cookie = cookie_for(PASSWORD, expiry)
    client = await connect_raw(node.port)
    client.transport.write(
        b"GET /admin/api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Cookie: pushd_admin=" + cookie.encode() + b"\r\n\r\n"
    )
    await client.until(b"event: stats")
    await wait_for(lambda: time.time() > expiry + 0.5, what="the cookie to expire")
    code, _, _ = await request(node, "GET", "/admin/api/nodes", cookie=f"pushd_admin={cookie}")
    assert code == 401
    # The stream should end within a few seconds of the expiry.
    ended = []
    client.lost.addCallback(ended.append)
    try:
        await wait_for(lambda: bool(ended), timeout=5, what="the expired page's stream to end")
    finally:
        client.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_login_cookie_is_secure_behind_a_tls_proxy(tmp_path: Path, nodes: list[Node]) -> None:
    """The README: serve /admin over TLS, "an ssl: listener, or behind a TLS
    proxy", and the cookie is `Secure` over TLS. Behind the TLS proxy (pushd
    told of it with --trusted-proxies 1; nginx sends X-Forwarded-Proto, as
    etc/nginx-pushd.conf does), the login cookie lacks `Secure`, so the
    browser also sends it on any plain http:// request to that host."""
    node = await admin_node(nodes, tmp_path, "--trusted-proxies", "1")
    code, headers, body = await request(
        node,
        "POST",
        "/admin/api/login",
        json.dumps({"password": PASSWORD}).encode(),
        content_type="application/json",
        x_pushd_admin="1",
        x_forwarded_for="203.0.113.7",
        x_forwarded_proto="https",
        origin="https://push.example.com",
        host="push.example.com",
    )
    assert code == 204, body
    [set_cookie] = headers.getRawHeaders("set-cookie")
    assert "secure" in set_cookie.lower(), set_cookie


@pytest_twisted.ensureDeferred
async def test_admin_actions_refuse_other_origins_and_bare_posts(
    tmp_path: Path, nodes: list[Node]
) -> None:
    """With a valid cookie, a publish from a page of another site (a form or a
    text/plain fetch: no X-Pushd-Admin), with Origin `null` (sandboxed
    iframe, file://), a look-alike host or another port is refused 403, and
    nothing reaches the channel; the same origin with the header passes."""
    node = await admin_node(nodes, tmp_path)
    cookie = f"pushd_admin={cookie_for(PASSWORD, int(time.time()) + 600)}"
    path = "/admin/api/channels/csrf/publish"
    body = b'{"data":"evil"}'
    refused: list[dict[str, Any]] = [
        {"content_type": "application/x-www-form-urlencoded"},
        {"content_type": "text/plain", "origin": "http://evil.example"},
        {"x_pushd_admin": "1", "origin": "null"},
        {"x_pushd_admin": "1", "origin": f"{node.url}.evil.example"},
        {"x_pushd_admin": "1", "origin": "http://127.0.0.1:1"},
        {"x_pushd_admin": "1", "origin": "http://127.0.0.1"},
        {"x_pushd_admin": "true"},
        {"x_pushd_admin": "0"},
    ]
    for headers in refused:
        code, _, answer = await request(node, "POST", path, body, cookie=cookie, **headers)
        assert code == 403, (headers, answer)
    code, _, answer = await request(node, "GET", "/admin/api/channels/csrf", cookie=cookie)
    assert code == 200 and json.loads(answer)["messages"] == [], answer
    code, _, answer = await request(
        node, "POST", path, body, cookie=cookie, x_pushd_admin="1", origin=node.url
    )
    assert code == 200, answer
    # A cookie signed under another password, and an altered one, are refused.
    good = cookie_for(PASSWORD, int(time.time()) + 600)
    for bad in (
        cookie_for("another password", int(time.time()) + 600),
        # Its last hex digit changed (to "0" it was, one time in 16, itself).
        good[:-1] + ("1" if good.endswith("0") else "0"),
        cookie_for(PASSWORD, int(time.time()) - 1),
    ):
        code, _, _ = await request(node, "GET", "/admin/api/nodes", cookie=f"pushd_admin={bad}")
        assert code == 401, bad


@pytest_twisted.ensureDeferred
async def test_metrics_key_and_producer_keys_stay_apart(tmp_path: Path, nodes: list[Node]) -> None:
    """--metrics-key opens /metrics and nothing else; a producer key no longer
    opens /metrics; neither opens the admin API."""
    node = start(
        nodes,
        tmp_path,
        "--metrics-key",
        "metrics-key-of-newcomer-5",
        "--api-key",
        "producer-key-of-newcomer-5",
        "--admin-password",
        PASSWORD,
    )
    await wait_for(lambda: "listening on" in node.output(), timeout=30, what="pushd to listen")
    metrics = {"authorization": "Bearer metrics-key-of-newcomer-5"}
    producer = {"authorization": "Bearer producer-key-of-newcomer-5"}
    assert (await request(node, "GET", "/metrics", **metrics))[0] == 200
    assert (await request(node, "GET", "/metrics", **producer))[0] == 401
    assert (await request(node, "GET", "/metrics"))[0] == 401
    assert (await request(node, "POST", "/channels/x", b"1", **metrics))[0] == 401
    for headers in (metrics, producer):
        assert (await request(node, "GET", "/admin/api/nodes", **headers))[0] == 401


@pytest_twisted.ensureDeferred
async def test_a_killed_node_leaves_the_view_within_10_s(
    tmp_path: Path, nodes: list[Node], own_redis: RedisServer
) -> None:
    """Two nodes on one Redis; one is SIGKILLed: the other's view drops it
    within 10 s."""
    redis = f"redis://127.0.0.1:{own_redis.port}"
    a = await admin_node(nodes, tmp_path, "--redis", redis)
    b = await admin_node(nodes, tmp_path, "--redis", redis)
    cookie = f"pushd_admin={cookie_for(PASSWORD, int(time.time()) + 600)}"

    async def count() -> int:
        code, _, body = await request(a, "GET", "/admin/api/nodes", cookie=cookie)
        assert code == 200
        return len(json.loads(body)["nodes"])

    await wait_for(lambda: _eq(count(), 2), timeout=10, what="both nodes in the view")
    b.kill()
    nodes.remove(b)
    await wait_for(lambda: _eq(count(), 1), timeout=10, what="the dead node to leave")


async def _eq(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


# --- a JWKS URL that trickles --------------------------------------------------------


class Trickle(Resource):
    """Answers 200 with a JSON content type and a Content-Length, then a byte
    a second, forever: a stuck identity provider, or a proxy in front of it."""

    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)
        self.loops: list[LoopingCall] = []

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"100000")
        request.write(b"{")
        loop = LoopingCall(lambda: request.write(b" "))
        loop.clock = reactor
        loop.start(1.0, now=False)
        self.loops.append(loop)
        request.notifyFinish().addBoth(lambda _: loop.running and loop.stop())
        return NOT_DONE_YET


@pytest_twisted.async_yield_fixture
async def trickle() -> AsyncIterator[str]:
    resource = Trickle()
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}/.well-known/jwks.json"
    for loop in resource.loops:
        if loop.running:
            loop.stop()
    await port.stopListening()


def rs256_token() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(
        {"sub": "alice", "channels": ["news"], "exp": int(time.time()) + 600},
        key,
        algorithm="RS256",
        headers={"kid": "k1"},
    )


@pytest_twisted.ensureDeferred
async def test_a_trickling_jwks_url_refuses_token_clients(
    tmp_path: Path, nodes: list[Node], trickle: str
) -> None:
    """The README: "Until a first fetch succeeds, token clients are refused
    with 503 auth_unavailable", and the fetch has a timeout. A JWKS URL that
    sends its body a byte a second never times out: a token client's request
    hangs (minutes, forever), nothing is logged. Expected: 503 within the
    fetch's timeout (10 s) and a little more."""
    node = start(nodes, tmp_path, "--token-jwks-url", trickle)
    await wait_for(lambda: "listening on" in node.output(), timeout=30, what="pushd to listen")
    d = treq.get(f"{node.url}/sse?channel=news&token={rs256_token()}", persistent=False)
    try:
        response = await with_timeout(d, 25)
    except Exception as e:  # the request never got an answer
        raise AssertionError(f"no answer within 25 s: {e!r}") from None
    assert response.code == 503, await response.content()


@pytest_twisted.ensureDeferred
async def test_check_token_with_a_trickling_jwks_url_ends(trickle: str) -> None:
    """`pushd check-token --token-jwks-url URL TOKEN` against that URL never
    returns. Expected: `invalid: token keys unavailable ...`, exit 1, within
    the fetch's timeout."""
    # coreutils' timeout ends the command (status 124) if it hangs.
    out_b, err_b, code = await with_timeout(
        getProcessOutputAndValue(
            "/usr/bin/timeout",
            ["25", PUSHD, "check-token", "--token-jwks-url", trickle, rs256_token()],
            env=clean_env(),
        ),
        40,
    )
    out, err = out_b.decode(), err_b.decode()
    assert code != 124, "check-token did not end within 25 s"
    assert code == 1 and out.startswith("invalid"), (code, out, err)


# --- a Redis that stops answering -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_frozen_redis_is_said_in_words_not_tracebacks(
    tmp_path: Path, nodes: list[Node], own_redis: RedisServer
) -> None:
    """Redis (with a password) freezes (SIGSTOP: a stalled VM, a fork on a
    huge dataset) while a publish is in flight; the publish gets its 504.
    Then pushd's log shows, at level critical, a run of `Unhandled error in
    Deferred: ... OutcomeUnknown: Redis connection lost` tracebacks, the
    publish connection's state line says `set-up failed: (5.0, 'Deferred')`
    and the pool's says `Redis refused AUTH: Not received Redis response`
    (Redis refused nothing: it did not answer). Expected: the README's state
    lines in words (`unreachable: ...; retrying`), and no traceback."""
    import subprocess

    subprocess.run(
        ["redis-cli", "-p", str(own_redis.port), "config", "set", "requirepass", "frozen-pw"],
        check=True,
        capture_output=True,
    )
    node = start(
        nodes,
        tmp_path,
        "--redis",
        f"redis://:frozen-pw@127.0.0.1:{own_redis.port}",
        "--redis-timeout",
        "1",
        "--log-format",
        "json",
    )
    await node.ready()
    assert own_redis.process is not None
    own_redis.process.send_signal(signal.SIGSTOP)
    try:
        code, _, _ = await request(
            node, "POST", "/channels/frozen", b"1", content_type="application/json"
        )
        assert code in (503, 504)
        # Frozen long enough for the connections' set-ups to time out too.
        await wait_for(
            lambda: "set-up failed" in node.output() or "Unhandled error" in node.output(),
            timeout=30,
            what="the set-ups to fail",
        )
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
    await wait_for(lambda: _eq(_code(node, "/health"), 200), timeout=30, what="pushd back on Redis")
    code, _, _ = await request(
        node, "POST", "/channels/frozen", b"2", content_type="application/json"
    )
    assert code == 200
    # Give a late "Unhandled error" (logged when its Deferred is collected) a chance.
    with contextlib.suppress(AssertionError):
        await wait_for(lambda: "Unhandled error" in node.output(), timeout=3)
    problems = []
    for line in node.output().splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record["level"] == "critical" or "Unhandled error" in record["message"]:
            problems.append(record["message"] or record.get("failure", ""))
        elif any(words in record["message"] for words in UNWORDS):
            problems.append(record["message"])
    assert not problems, "\n".join(problems)


#: What a state line should not say: a repr, or a refusal where Redis said nothing.
UNWORDS = ("(5.0, 'Deferred')", "(1.0, 'Deferred')", "refused AUTH: Not received")


async def _code(node: Node, path: str) -> int:
    code, _, _ = await request(node, "GET", path)
    return code


# --- a config file that is not UTF-8 ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_config_file_not_in_utf8_is_one_line(tmp_path: Path, nodes: list[Node]) -> None:
    """/etc/pushd/pushd.ini edited in a Latin-1 editor (`# café` in a
    comment): `pushd check-config` and `twistd -n pushd --config` print a
    UnicodeDecodeError traceback. Expected: one line, `pushd: error:
    --config: pushd.ini: ...`, exit status 2, as for a missing file or a file
    without a section header."""
    ini = tmp_path / "pushd.ini"
    ini.write_bytes(b"# caf\xe9: the config of the caf\xe9's pushd\n[pushd]\nhistory-size = 10\n")
    code, _, err = await pushd_command("check-config", "--config", str(ini))
    assert "Traceback" not in err, err
    assert code == 2 and err.strip().startswith("pushd: error: --config"), (code, err)

    node = start(nodes, tmp_path, "--config", str(ini))
    assert node.process is not None
    await wait_for(lambda: node.process.poll() is not None, timeout=30, what="pushd to stop")
    nodes.remove(node)
    output = node.output()
    assert "Traceback" not in output, output


# --- an identity provider's user ids ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_console_disconnects_an_auth0_user(tmp_path: Path, nodes: list[Node]) -> None:
    """Tokens from an identity provider (the point of --token-jwks-url) carry
    its user ids: Auth0's are `auth0|5f7c...` or `google-oauth2|1234...`.
    pushd admits such a client (and `pushd token --sub 'auth0|...'` makes
    the token), but the admin console's "disconnect" (and unsubscribe, and
    POST /users/{user}/disconnect) answers 400 bad_user: the operator cannot
    throw that user out. Expected: a user pushd admits can be disconnected
    (4003)."""
    from urllib.parse import quote

    from tests.support import SECRET, connect_ws, token

    node = start(
        nodes, tmp_path, "--token-secret", SECRET, "--admin-key", "admin-key-of-newcomer-5"
    )
    await node.ready()
    user = "auth0|5f7c8ec7c33c6c004bbafe82"
    client = await connect_ws(node.port, f"/ws?token={token(user, ['news'])}")
    try:
        code, _, body = await request(
            node,
            "POST",
            f"/admin/api/users/{quote(user, safe='')}/disconnect",
            authorization="Bearer admin-key-of-newcomer-5",
        )
        assert code == 200 and json.loads(body) == {"nodes": 1}, body
        _, close_code, _ = await with_timeout(client.closed)
        assert close_code == 4003
    finally:
        client.transport.abortConnection()


# --- an --auth-url with credentials --------------------------------------------------


class AuthApp(Resource):
    """The application behind --auth-url: admits everyone, notes each request's
    Authorization header."""

    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)
        self.authorizations: list[bytes | None] = []

    def render_POST(self, request: Request) -> bytes:
        self.authorizations.append(request.getHeader(b"authorization"))
        request.setHeader(b"content-type", b"application/json")
        return b'{"sub":"alice","channels":["*"]}'


@pytest_twisted.ensureDeferred
async def test_an_auth_url_with_credentials_admits_clients(
    tmp_path: Path, nodes: list[Node]
) -> None:
    """The README treats a password in --auth-url as normal ("a
    --redis/--auth-url URL shows without its password", masked in logs and
    check-config), so an operator protects the application's endpoint with
    `--auth-url http://pushd:SECRET@app/auth`. Then every client is refused
    403 without the application even being asked; the log says `--auth-url
    refused a client: invalid hostname: pushd:@127.0.0.1`. Expected: the
    application asked (with the credentials as Basic auth) and the client
    admitted; or, if credentials are not supported, a one-line start-up
    error."""
    app = AuthApp()
    port = reactor.listenTCP(0, Site(app), interface="127.0.0.1")
    try:
        url = f"http://pushd:app-secret-5@127.0.0.1:{port.getHost().port}/auth"
        node = start(nodes, tmp_path, "--auth-url", url)
        await wait_for(
            lambda: "listening on" in node.output() or node.process.poll() is not None,
            timeout=30,
            what="pushd to listen (or stop)",
        )
        if node.process.poll() is not None:
            assert "Traceback" not in node.output()
            return  # refused at start-up in words: acceptable
        response = await treq.get(f"{node.url}/sse?channel=news", persistent=False)
        code = response.code
        response.original.deliverBody(_Ignore())  # type: ignore[attr-defined]
        assert code == 200, node.output()[-400:]
        assert app.authorizations and app.authorizations[0] is not None
        assert app.authorizations[0].startswith(b"Basic ")
    finally:
        await port.stopListening()


class _Ignore:
    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass


# --- a dual-stack listener ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_loopback_through_a_dual_stack_listener(tmp_path: Path, nodes: list[Node]) -> None:
    """`--listen 'tcp6:8080:interface=\\:\\:'` is how one listens on IPv4 and
    IPv6 at once; an IPv4 client then shows as `::ffff:127.0.0.1`. With no
    key configured, the README opens /metrics and the producer API to
    loopback clients: the backend on the same machine posting to
    http://127.0.0.1:8080 gets 403 from both (and Prometheus scraping
    127.0.0.1 too). Expected: 127.0.0.1 is loopback whichever socket it
    came through."""
    from tests.support import free_port

    port6 = free_port()
    node = start(nodes, tmp_path, "--listen", f"tcp6:{port6}:interface=\\:\\:")
    await node.ready()
    url = f"http://127.0.0.1:{port6}"
    response = await treq.get(f"{url}/metrics", persistent=False)
    await response.content()
    metrics_code = response.code
    response = await treq.post(
        f"{url}/channels/dual",
        b"1",
        headers={"content-type": ["application/json"]},
        persistent=False,
    )
    body = await response.content()
    assert (metrics_code, response.code) == (200, 200), body


# --- the stats hash taken by something else --------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_stats_key_of_another_type_is_said(
    tmp_path: Path, nodes: list[Node], own_redis: RedisServer
) -> None:
    """`<prefix>!stats` holds a string (another program on the Redis, a prefix
    shared by mistake): Redis answers every node's tick WRONGTYPE, and each
    node's console shows itself alone, `"partial": true`, while /health says
    Redis is up, and nothing at all is logged. Expected: the reason in the
    log (once, as for a presence key of another type)."""
    import subprocess

    node = await admin_node(
        nodes, tmp_path, "--redis", f"redis://127.0.0.1:{own_redis.port}", "--redis-prefix", "st:"
    )
    subprocess.run(
        ["redis-cli", "-p", str(own_redis.port), "set", "st:!stats", "not a hash"],
        check=True,
        capture_output=True,
    )
    cookie = f"pushd_admin={cookie_for(PASSWORD, int(time.time()) + 600)}"

    async def partial() -> bool:
        code, _, body = await request(node, "GET", "/admin/api/nodes", cookie=cookie)
        return code == 200 and json.loads(body)["partial"] is True

    await wait_for(partial, timeout=10, what="the view to be partial")
    assert (await _code(node, "/health")) == 200
    await wait_for(
        lambda: "st:!stats" in node.output() or "WRONGTYPE" in node.output(),
        timeout=5,
        what="a log line about the stats key",
    )


# --- a JWKS URL with credentials -------------------------------------------------------


class Jwks(Resource):
    """A JWKS of one RSA key, `kid` "k1"."""

    isLeaf = True

    def __init__(self, key: Any) -> None:
        Resource.__init__(self)
        public = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        self.body = json.dumps({"keys": [{**public, "kid": "k1", "use": "sig"}]}).encode()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return self.body


@pytest_twisted.ensureDeferred
async def test_a_jwks_url_password_is_not_sent_to_clients(
    tmp_path: Path, nodes: list[Node]
) -> None:
    """An identity provider's JWKS behind basic auth: `--token-jwks-url
    http://pushd:SECRET@idp/jwks.json` (check-config masks that password, so
    it is expected). The fetch fails ("Name or service not known": the
    credentials are not understood), and then every token client, anyone on
    the internet, gets `503 {"message":"token keys unavailable: the keys of
    http://pushd:SECRET@.../jwks.json could not be fetched"}`; the text log
    says it too. Expected: the password in no answer and no log line (and,
    better, the keys fetched)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    port = reactor.listenTCP(0, Site(Jwks(key)), interface="127.0.0.1")
    secret = "jwks-basic-auth-secret-5"
    try:
        url = f"http://pushd:{secret}@127.0.0.1:{port.getHost().port}/jwks.json"
        node = start(nodes, tmp_path, "--token-jwks-url", url)
        await wait_for(lambda: "listening on" in node.output(), timeout=30, what="pushd")
        tok = jwt.encode(
            {"sub": "alice", "channels": ["news"], "exp": int(time.time()) + 600},
            key,
            algorithm="RS256",
            headers={"kid": "k1"},
        )
        d = treq.get(f"{node.url}/sse?channel=news&token={tok}", persistent=False)
        response = await with_timeout(d, 20)
        if response.code == 200:
            response.original.deliverBody(_Ignore())  # type: ignore[attr-defined]
            body = b""
        else:
            body = await response.content()
        assert secret.encode() not in body, body
        assert secret not in node.output(), node.output()[-600:]
    finally:
        await port.stopListening()
