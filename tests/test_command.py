"""The `pushd` command, run as the installed console script: its subcommands
against real pushd processes (`pushd run`, and twistd nodes)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
import treq
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from twisted.internet import reactor
from twisted.internet.error import ConnectError
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.resource import Resource
from twisted.web.server import Site

import pushd
from pushd.auth import Grants, TokenVerifier
from pushd.command import duration, twistd_argv
from pushd.token_keys import read_public_key
from tests.support import SECRET, Node, connect_ws, wait_for, with_timeout

PUSHD = str(Path(sys.executable).parent / "pushd")
SUBCOMMANDS = ("run", "version", "token", "check-token", "check-config", "publish",
               "subscribe", "check")  # fmt: skip


def clean_env(**more: str) -> dict[str, str]:
    """The test's environment without pushd's own settings, plus `more`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHD_")}
    return {**env, **more}


async def pushd_command(
    *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, str, str]:
    """`pushd ARGV` (the console script, by path: bash's `pushd` is a builtin);
    its exit status, stdout and stderr. The reactor runs meanwhile."""
    out, err, code = await with_timeout(
        getProcessOutputAndValue(
            PUSHD, list(argv), env=env or clean_env(), path=str(cwd) if cwd else None
        ),
        60,
    )
    return code, out.decode(), err.decode()


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    return lines[-1]


# --- the command and its help ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_help_lists_the_subcommands() -> None:
    code, out, _ = await pushd_command("--help")
    assert code == 0
    for name in SUBCOMMANDS:
        assert f"\n    {name}" in out, name
    code, _, err = await pushd_command()
    assert code == 2 and "COMMAND" in err
    code, _, err = await pushd_command("no-such-command")
    assert code == 2 and "invalid choice: 'no-such-command'" in err
    code, out, _ = await pushd_command("run", "--help")
    assert code == 0 and out.startswith("Usage: pushd run [options]")
    for option in ("--pidfile=", "--history-size=", "--token-public-key=", "--config="):
        assert option in out, option


@pytest_twisted.ensureDeferred
async def test_version() -> None:
    from importlib.metadata import version

    code, out, _ = await pushd_command("version")
    assert code == 0
    assert out.splitlines() == [
        f"pushd {pushd.__version__}",
        f"Python {'.'.join(map(str, sys.version_info[:3]))}",
        f"Twisted {version('twisted')}",
        f"Autobahn {version('autobahn')}",
    ]
    assert (await pushd_command("--version"))[1] == out
    assert (await pushd_command("run", "--version"))[1] == out  # not twistd's


def test_durations() -> None:
    assert [duration(t) for t in ("30s", "15m", "1h", "7d", "90")] == [30, 900, 3600, 604800, 90]
    for bad in ("0", "1w", "-5", "1.5h", "h", ""):
        with pytest.raises(Exception, match="a duration above 0"):
            duration(bad)


def test_run_is_twistd_in_the_foreground() -> None:
    assert twistd_argv(["--history-size", "5"]) == [
        "twistd", "--nodaemon", "--pidfile=", "pushd", "--history-size", "5",
    ]  # fmt: skip
    assert twistd_argv(["--pidfile", "/run/p.pid", "--demo", "off"])[1:4] == [
        "--nodaemon",
        "--pidfile=/run/p.pid",
        "pushd",
    ]
    assert twistd_argv(["--pidfile=p.pid"])[2] == "--pidfile=p.pid"


# --- token and check-token ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_token_takes_the_secret_as_the_server_does(tmp_path: Path) -> None:
    ini = tmp_path / "pushd.ini"
    ini.write_text("[pushd]\ntoken-secret = from-the-file-from-the-file-32b!!\n"
                   "token-audience = pushd-aud\n")  # fmt: skip
    start = int(time.time())
    argv = ("token", "--sub", "alice", "--channel", "news", "--channel", "chat.*",
            "--publish", "chat.1", "--info", '{"name": "Alice"}', "--ttl", "15m")  # fmt: skip
    # Command line > environment > --config file, as for the server.
    for extra, env, secret in (
        (("--config", str(ini)), {}, "from-the-file-from-the-file-32b!!"),
        (("--config", str(ini)), {"PUSHD_TOKEN_SECRET": SECRET}, SECRET),
        (("--config", str(ini), "--token-secret", SECRET + "x"), {"PUSHD_TOKEN_SECRET": SECRET},
         SECRET + "x"),
        ((), {"PUSHD_CONFIG": str(ini)}, "from-the-file-from-the-file-32b!!"),
    ):  # fmt: skip
        code, out, err = await pushd_command(*argv, *extra, env=clean_env(**env))
        assert (code, err) == (0, ""), err
        claims = jwt.decode(out.strip(), secret, algorithms=["HS256"], audience="pushd-aud")
        assert claims["sub"] == "alice"
        assert claims["channels"] == ["news", "chat.*"] and claims["publish"] == ["chat.1"]
        assert claims["info"] == {"name": "Alice"}
        assert claims["exp"] - claims["iat"] == 900 and claims["iat"] >= start
        grants = TokenVerifier(secret, "pushd-aud").verify(out.strip())
        assert isinstance(grants, Grants) and grants.may_subscribe("chat.x")


@pytest_twisted.ensureDeferred
async def test_token_errors_are_one_line() -> None:
    code, out, err = await pushd_command("token", "--sub", "a")
    assert (code, out) == (2, "")
    assert err.strip() == (
        "pushd token: error: no token secret: give --token-secret, PUSHD_TOKEN_SECRET or "
        "token-secret in --config (or sign with --private-key)"
    )
    env = clean_env(PUSHD_TOKEN_SECRET=SECRET)
    code, _, err = await pushd_command("token", "--info", "{not json", env=env)
    assert code == 2 and "argument --info: '{not json' is not JSON" in one_error_line(err)
    code, out, _ = await pushd_command("token", "--info", "null", env=env)
    assert code == 0 and jwt.decode(out.strip(), SECRET, algorithms=["HS256"])["info"] is None
    code, _, err = await pushd_command("token", "--ttl", "soon", env=env)
    assert code == 2 and "a duration above 0" in one_error_line(err)
    code, _, err = await pushd_command("token", env=clean_env(PUSHD_HISTORY_SIZE="ten"))
    assert code == 2
    assert err.strip() == (
        "pushd token: error: --history-size 'ten' (PUSHD_HISTORY_SIZE): must be a whole number"
    )


@pytest_twisted.ensureDeferred
async def test_token_signed_with_a_private_key(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    private = tmp_path / "private.pem"
    private.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    public = tmp_path / "public.pem"
    public.write_bytes(
        key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    code, out, err = await pushd_command(
        "token", "--sub", "bob", "--channel", "*", "--private-key", str(private), "--kid", "k1"
    )
    assert (code, err) == (0, ""), err
    assert jwt.get_unverified_header(out.strip()) == {"alg": "ES256", "typ": "JWT", "kid": "k1"}
    grants = TokenVerifier(public_key=read_public_key(str(public))).verify(out.strip())
    assert isinstance(grants, Grants) and grants.sub == "bob"
    code, out, _ = await pushd_command(
        "check-token", out.strip(), env=clean_env(PUSHD_TOKEN_PUBLIC_KEY=str(public))
    )
    assert code == 0 and out.splitlines()[:2] == ["valid", "sub: bob"]


@pytest_twisted.ensureDeferred
async def test_check_token() -> None:
    env = clean_env(PUSHD_TOKEN_SECRET=SECRET)
    code, tok, _ = await pushd_command(
        "token", "--sub", "alice", "--channel", "news", "--ttl", "1h", env=env
    )
    code, out, err = await pushd_command("check-token", tok.strip(), env=env)
    assert (code, err) == (0, ""), err
    lines = out.splitlines()
    assert lines[:4] == ["valid", "sub: alice", "channels: news", "publish: (none)"]
    assert lines[4].startswith("expires: ")
    when, _, left = lines[4].removeprefix("expires: ").partition(" (")
    expires = datetime.fromisoformat(when).timestamp()
    assert abs(expires - (time.time() + 3600)) < 60
    assert 3500 < int(left.split()[0]) <= 3600

    code, out, _ = await pushd_command(
        "check-token", tok.strip(), "--token-secret", SECRET + "-other", env=env
    )
    assert (code, out) == (1, "invalid: Signature verification failed\n")
    expired = jwt.encode({"exp": int(time.time()) - 5}, SECRET, algorithm="HS256")
    code, out, _ = await pushd_command("check-token", expired, env=env)
    assert (code, out) == (1, "invalid: the token has expired\n")
    code, out, _ = await pushd_command("check-token", "garbage", env=env)
    assert code == 1 and out.startswith("invalid: ")
    code, _, err = await pushd_command("check-token", tok.strip())
    assert code == 2
    assert err.strip() == (
        "pushd check-token: error: no --token-secret, --token-public-key or --token-jwks-url "
        "(option, PUSHD_<OPTION> or --config)"
    )


class Jwks(Resource):
    isLeaf = True

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        Resource.__init__(self)
        self.keys = keys

    def render_GET(self, request: Any) -> bytes:
        return json.dumps({"keys": self.keys}).encode()


@pytest_twisted.ensureDeferred
async def test_check_token_with_a_jwks(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    port = reactor.listenTCP(0, Site(Jwks([{**public, "kid": "k1"}])), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}/jwks.json"
    try:
        claims = {"exp": int(time.time()) + 60, "sub": "carol", "channels": ["a", "b"]}
        tok = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k1"})
        code, out, err = await pushd_command("check-token", tok, "--token-jwks-url", url)
        assert (code, err) == (0, ""), err
        assert out.splitlines()[:3] == ["valid", "sub: carol", "channels: a, b"]
        other = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k2"})
        code, out, _ = await pushd_command("check-token", other, "--token-jwks-url", url)
        assert (code, out) == (1, "invalid: no key 'k2' in the JWKS\n")
    finally:
        await port.stopListening()


# --- check-config ---------------------------------------------------------------


def settings(out: str) -> dict[str, tuple[str, str]]:
    """check-config's table: option -> (value, source)."""
    table = {}
    for line in out.splitlines():
        name, _, rest = line.partition(" ")
        value, _, source = rest.strip().rpartition("  ")
        table[name] = (value.strip(), source.strip())
    return table


@pytest_twisted.ensureDeferred
async def test_check_config_says_where_each_setting_came_from(tmp_path: Path) -> None:
    ini = tmp_path / "pushd.ini"
    ini.write_text(
        "[pushd]\nhistory-size = 7\nhistory-ttl = 60\nauth-url = https://u:url-pw@app.example/a\n"
    )
    env = clean_env(
        PUSHD_CONFIG=str(ini),
        PUSHD_HISTORY_TTL="90",
        PUSHD_REDIS="redis://:redis-pw@127.0.0.1:6379/2",
        PUSHD_TOKEN_SECRET="the-token-secret",
    )
    code, out, err = await pushd_command(
        "check-config", "--api-key", "key-one", "--api-key", "key-two", "--history-ttl", "120",
        env=env,
    )  # fmt: skip
    assert (code, err) == (0, ""), err
    table = settings(out)
    assert out.splitlines()[0].split(None, 1) == ["config", f"{ini} (env PUSHD_CONFIG)"]
    assert table["history-ttl"] == ("120", "command line")
    assert table["history-size"] == ("7", f"config file {ini}")
    assert table["redis"] == ("redis://127.0.0.1:6379/2", "env PUSHD_REDIS")
    assert table["auth-url"] == ("https://u@app.example/a", f"config file {ini}")
    assert table["api-key"] == ("******** ********", "command line")
    assert table["token-secret"] == ("********", "env PUSHD_TOKEN_SECRET")
    assert table["max-subscriptions"] == ("100", "default")
    assert table["demo"] == ("off", "default")  # with Redis
    for secret in ("key-one", "key-two", "redis-pw", "url-pw", "the-token-secret"):
        assert secret not in out, secret


@pytest_twisted.ensureDeferred
async def test_check_config_stops_on_a_bad_setting(tmp_path: Path) -> None:
    code, out, err = await pushd_command("check-config", env=clean_env(PUSHD_HISTORY_SIZE="0"))
    assert (code, out) == (2, "")
    assert err.strip() == "pushd: error: --history-size '0' (PUSHD_HISTORY_SIZE): must be 1 or more"
    code, _, err = await pushd_command("check-config", "--no-such-option")
    assert code == 2
    assert err.strip() == "pushd check-config: error: option --no-such-option not recognized"
    code, _, err = await pushd_command("check-config", "--token-public-key", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot read" in err


# --- run, publish, subscribe, check ---------------------------------------------


class RunNode(Node):
    """`pushd run` in a process of its own, as an operator starts it."""

    def __init__(self, directory: Path, *options: str, env: dict[str, str] | None = None) -> None:
        super().__init__(directory, *options, env=env)

    def start(self) -> None:
        import subprocess

        self.process = subprocess.Popen(
            [PUSHD, "run", "--listen", f"tcp:{self.port}:interface=127.0.0.1", *self.options],
            cwd=self.directory,
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )


async def healthy(node: Node) -> None:
    async def up() -> bool:
        try:
            response = await treq.get(f"{node.url}/health", persistent=False)
        except ConnectError:
            return False
        await response.content()
        return response.code == 200

    await wait_for(up, timeout=30, what=f"pushd on port {node.port}")


@pytest.fixture
def run_nodes(tmp_path: Path) -> Iterator[list[RunNode]]:
    nodes: list[RunNode] = []
    yield nodes
    for node in nodes:
        node.stop()


@pytest_twisted.ensureDeferred
async def test_run_serves_with_every_option_passed_through(
    tmp_path: Path, run_nodes: list[RunNode]
) -> None:
    env = clean_env(PUSHD_TOKEN_SECRET=SECRET)
    node = RunNode(tmp_path, "--api-key", "backend-key", "--history-size", "2", env=env)
    run_nodes.append(node)
    node.start()
    await healthy(node)
    # The options reached pushd: the key is wanted, tokens are required.
    response = await treq.post(f"{node.url}/channels/news", b"x", persistent=False)
    assert response.code == 401
    _, tok, _ = await pushd_command("token", "--channel", "news", env=env)
    ws = await connect_ws(node.port, f"/ws?channel=news&token={tok.strip()}")
    assert (await ws.next_of("subscribed"))["channel"] == "news"
    await ws.close()
    # In the foreground, and no pid file unless asked.
    assert node.process is not None and node.process.poll() is None
    assert not (tmp_path / "twistd.pid").exists()
    assert await node.terminate() in (0, -signal.SIGTERM)
    assert "Server Shut Down." in node.output()


@pytest_twisted.ensureDeferred
async def test_run_writes_a_pid_file_when_asked(tmp_path: Path, run_nodes: list[RunNode]) -> None:
    pidfile = tmp_path / "run" / "pushd.pid"
    pidfile.parent.mkdir()
    node = RunNode(tmp_path, "--pidfile", str(pidfile))
    run_nodes.append(node)
    node.start()
    await healthy(node)
    assert node.process is not None
    assert pidfile.read_text().strip() == str(node.process.pid)
    await node.terminate()
    assert not pidfile.exists()  # twistd removes it on the way out


@pytest_twisted.ensureDeferred
async def test_run_stops_on_a_bad_setting_in_one_line(tmp_path: Path) -> None:
    code, _, err = await pushd_command("run", "--history-size", "-3", cwd=tmp_path)
    assert code == 2
    assert err.strip() == "pushd: error: --history-size '-3' (command line): must be 1 or more"


@pytest_twisted.ensureDeferred
async def test_publish_subscribe_and_check(tmp_path: Path, run_nodes: list[RunNode]) -> None:
    node = RunNode(tmp_path)
    run_nodes.append(node)
    node.start()
    await healthy(node)
    code, out, err = await pushd_command("publish", "news", "hello", "--url", node.url)
    assert (code, err) == (0, ""), err
    published = out.strip()
    code, out, err = await pushd_command(
        "subscribe", "news", "--since", "0-0", "--count", "1", "--url", node.url
    )
    assert (code, err) == (0, ""), err
    assert json.loads(out) == {"type": "message", "channel": "news", "id": published,
                               "data": "hello"}  # fmt: skip
    code, out, err = await pushd_command("check", node.url)
    assert code == 0 and out.splitlines()[-1].startswith("pushd-check: OK"), out + err
    # The old names answer as before.
    code, _, err = await pushd_command("publish", "bad channel", "x")
    assert code == 2 and "usage: pushd-cli" in err


@pytest_twisted.ensureDeferred
async def test_python_m_pushd() -> None:
    out, _, code = await with_timeout(
        getProcessOutputAndValue(sys.executable, ["-m", "pushd", "version"], env=clean_env()), 60
    )
    assert code == 0 and out.decode().startswith(f"pushd {pushd.__version__}\n")


@pytest_twisted.ensureDeferred
async def test_pushdctl_is_the_same_program_under_a_name_bash_does_not_take() -> None:
    """`pushd` is a bash builtin; `pushdctl` reaches the program from any shell."""
    script = "pushdctl version; pushd version 2>/dev/null; echo builtin:$?"
    env = {**clean_env(), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    out, _, code = await with_timeout(
        getProcessOutputAndValue("/bin/bash", ["-c", script], env=env), 60
    )
    lines = out.decode().splitlines()
    assert code == 0 and lines[0] == f"pushd {pushd.__version__}"
    assert lines[-1] == "builtin:1"  # bash's own pushd took the other
