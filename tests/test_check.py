"""`pushd-check`: the post-install self-check, against a real pushd."""

from __future__ import annotations

import io
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
import treq
import twisted.test
from twisted.internet import reactor
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue

from pushd.client.check import run
from tests.support import (
    SECRET,
    Node,
    PushdUnderTest,
    StartPushd,
    free_port,
    token,
    wait_for,
    with_timeout,
)

RTT = re.compile(r"^(websocket|sse): received, round trip \d+\.\d ms$", re.M)


async def check(*argv: str) -> tuple[int, str, str]:
    """Run the check in this reactor: its exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = await with_timeout(run(reactor, list(argv), out, err), 30)
    return code, out.getvalue(), err.getvalue()


def assert_ok(code: int, out: str, err: str) -> None:
    assert (code, err) == (0, ""), out + err
    assert sorted(m.group(1) for m in RTT.finditer(out)) == ["sse", "websocket"], out
    assert re.search(r"^pushd-check: OK \(websocket [\d.]+ ms, sse [\d.]+ ms\)$", out, re.M), out
    lines = [line.split(":")[0] for line in out.splitlines()]
    # Both subscriptions come before the publish.
    assert lines.index("websocket") < lines.index("publish")
    assert lines.index("sse") < lines.index("publish")


def failure(code: int, err: str) -> str:
    """The one line of a failed check."""
    assert code == 1, err
    assert err.count("\n") == 1 and err.startswith("pushd-check: FAILED: "), err
    return err


@pytest_twisted.ensureDeferred
async def test_check_passes_on_both_brokers(pushd: PushdUnderTest) -> None:
    assert_ok(*await check(pushd.url))
    # An explicit channel, a trailing slash, a timeout.
    assert_ok(*await check(pushd.url + "/", "--channel", "ops.check", "--timeout", "5"))
    # The check hung up both its subscribers.
    await wait_for(lambda: not pushd.hub.channels(), what="the check's subscriptions to end")


@pytest_twisted.ensureDeferred
async def test_check_with_api_keys(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(api_key=("k",))
    code, out, err = await check(pushd.url, "--api-key", "wrong")
    assert "publish: 401 unauthorized" in failure(code, err)
    assert "websocket: subscribed" in out and "sse: subscribed" in out

    code, _, err = await check(pushd.url)
    assert "publish: 401 unauthorized" in failure(code, err)

    assert_ok(*await check(pushd.url, "--api-key", "k"))


@pytest_twisted.ensureDeferred
async def test_check_with_subscriber_tokens(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(token_secret=SECRET)
    code, _, err = await check(pushd.url)
    assert "websocket: handshake refused: 401" in failure(code, err)
    assert "--token" in err

    code, _, err = await check(pushd.url, "--token", token(channels=["*"], secret="other" * 8))
    assert "websocket: handshake refused: 401" in failure(code, err)

    code, _, err = await check(pushd.url, "--token", token(channels=["news"]))
    assert "websocket: error forbidden" in failure(code, err)

    assert_ok(*await check(pushd.url, "--token", token(channels=["*"])))


@pytest_twisted.ensureDeferred
async def test_check_times_out_when_the_message_never_comes(start_pushd: StartPushd) -> None:
    pushd = await start_pushd()
    assert pushd.service is not None
    # The bus loses everything: what the broker calls drops it.
    pushd.service.hub.receive = lambda channel, payload: None  # type: ignore[method-assign]
    code, out, err = await check(pushd.url, "--timeout", "0.3")
    assert "publish: accepted as" in out, out + err
    assert failure(code, err) == (
        "pushd-check: FAILED: timed out after 0.3 s waiting for the message "
        "over websocket and sse\n"
    )


@pytest_twisted.ensureDeferred
async def test_check_reports_the_server_going_away(start_pushd: StartPushd) -> None:
    pushd = await start_pushd()
    assert pushd.service is not None
    stopped: list[object] = []

    def stop_instead(channel: str, raw: bytes) -> None:  # SIGTERM as the message goes by
        assert pushd.service is not None
        stopped.append(pushd.service.stopService())

    pushd.service.hub.receive = stop_instead  # type: ignore[method-assign]
    code, out, err = await check(pushd.url, "--timeout", "5")
    assert "publish: accepted as" in out, out + err
    assert re.fullmatch(
        r"pushd-check: FAILED: (websocket: closed by the server: 1001 .*"
        r"|sse: the stream ended before the message arrived)\n",
        failure(code, err),
    ), err
    await stopped[0]


@pytest_twisted.ensureDeferred
async def test_check_without_a_server() -> None:
    code, _, err = await check(f"http://127.0.0.1:{free_port()}")
    assert "connection refused by 127.0.0.1:" in failure(code, err)


@pytest_twisted.ensureDeferred
async def test_check_of_a_server_that_never_answers() -> None:
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port.getHost().port}"
        code, _, err = await check(url, "--timeout", "0.3")
    finally:
        await port.stopListening()
    assert failure(code, err) == "pushd-check: FAILED: websocket: timed out after 0.3 s\n"


# Twisted's ssl: server endpoint hands pyOpenSSL objects to pyOpenSSL (pushd's side).
@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_check_over_tls_verifies_the_certificate(start_pushd: StartPushd) -> None:
    pem = Path(twisted.test.__file__).parent / "server.pem"  # self-signed, for another host
    pushd = await start_pushd(listen=(f"ssl:0:privateKey={pem}:interface=127.0.0.1",))
    code, _, err = await check(f"https://localhost:{pushd.port}", "--timeout", "5")
    assert failure(code, err) == (
        "pushd-check: FAILED: websocket: TLS failed: certificate verify failed\n"
    )


@pytest_twisted.ensureDeferred
async def test_check_of_something_that_is_not_pushd(pushd: PushdUnderTest) -> None:
    code, _, err = await check(pushd.url + "/elsewhere")
    assert "websocket: handshake refused: 404" in failure(code, err)


@pytest.mark.parametrize(
    "argv",
    [[], ["ftp://example.com"], ["http://h/?q=1"], ["http://h", "--timeout", "0"],
     ["http://h", "--channel", "bad channel"]],
)  # fmt: skip
@pytest_twisted.ensureDeferred
async def test_check_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await check(*argv)
    assert (code, out) == (2, "")
    assert "usage: pushd-check" in capsys.readouterr().err


# -- the command line, end to end: `python -m pushd.client.check` against `twistd -n pushd`


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    node = Node(tmp_path, "--api-key", "k")
    node.start()
    yield node
    node.stop()


async def command(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    out, err, code = await with_timeout(
        getProcessOutputAndValue(
            sys.executable, ["-m", "pushd.client.check", *argv], env={**os.environ, **(env or {})}
        ),
        60,
    )
    return code, out.decode(), err.decode()


async def healthy(node: Node) -> None:
    """Node.ready() reads /channels, which wants the key here: wait for /health instead."""

    async def up() -> bool:
        try:
            response = await treq.get(f"{node.url}/health", persistent=False)
        except ConnectError:
            return False
        return response.code == 200

    await wait_for(up, timeout=30, what=f"pushd on port {node.port}")


@pytest_twisted.ensureDeferred
async def test_the_command_against_twistd(node: Node) -> None:
    await healthy(node)
    assert_ok(*await command(node.url, "--api-key", "k"))
    # The key may come from the environment, out of `ps`.
    assert_ok(*await command(node.url, env={"PUSHD_CHECK_API_KEY": "k"}))

    code, _, err = await command(node.url, "--api-key", "wrong")
    assert "publish: 401 unauthorized" in failure(code, err)

    node.stop()
    code, _, err = await command(node.url)
    assert "connection refused" in failure(code, err)
