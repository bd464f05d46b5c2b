"""pushd.testing: the README's examples run verbatim, and the helper's promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, TimeoutError

from pushd.config import Config
from pushd.testing import PublishError, PushdServer, SubscribeError, make_config
from tests.support import SECRET, free_port, token

README = Path(__file__).parent.parent / "README.md"
SECTION = "## Testing your application with `pushd.testing`"


def readme_examples() -> list[str]:
    """The Python blocks of the README's pushd.testing section, in order."""
    text = README.read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end], re.S)


def test_the_section_has_a_pytest_and_a_trial_example() -> None:
    pytest_example, trial_example = readme_examples()
    assert "pytest_twisted" in pytest_example
    assert "twisted.trial" in trial_example


@pytest_twisted.ensureDeferred
async def test_readme_pytest_twisted_example() -> None:
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(readme_examples()[0], "README.md (pytest-twisted)", "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert tests
    for test in tests:
        await test()


def test_readme_trial_example(tmp_path: Path) -> None:
    """trial runs the example in a process of its own (its reactor, its dirty-reactor checks)."""
    (tmp_path / "test_news.py").write_text(readme_examples()[1])
    done = subprocess.run(
        [sys.executable, "-m", "twisted.trial", "test_news"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "PASSED (successes=1)" in output, output


def test_options_map_onto_config() -> None:
    config = make_config(api_key="k", token_secret=SECRET, history_size=5)
    assert config.api_key == ("k",)
    assert config.token_secret == SECRET and config.history_size == 5
    assert config.listen == ("tcp:0:interface=127.0.0.1",)
    assert config.ping_interval == 0 and not config.uses_redis
    assert make_config("unix:/tmp/p.sock", allowed_origin=["a", "b"]).allowed_origin == ("a", "b")
    assert make_config(["tcp:0", "tcp:1"]).listen == ("tcp:0", "tcp:1")
    assert isinstance(config, Config)
    with pytest.raises(TypeError, match="history_sise"):
        make_config(history_sise=5)
    with pytest.raises(TypeError, match="memory broker"):
        PushdServer(redis=object())


@pytest_twisted.ensureDeferred
async def test_an_endpoint_of_ones_own_and_errors() -> None:
    port = free_port()
    server = PushdServer(f"tcp:{port}:interface=127.0.0.1", api_key=["k", "k2"])
    await server.start()
    try:
        assert server.port == port and server.url == f"http://127.0.0.1:{port}"
        assert server.ws_url == f"ws://127.0.0.1:{port}/ws"
        with pytest.raises(PublishError) as refused:
            await server.publish("news", "x", headers={"authorization": "Bearer nope"})
        assert refused.value.code == 401 and refused.value.body["error"]
        with pytest.raises(PublishError) as refused:
            await server.publish("bad channel!", "x")
        assert refused.value.code in (400, 404)
        with pytest.raises(RuntimeError):
            await server.start()
    finally:
        await server.stop()
    await server.stop()  # twice is fine


@pytest_twisted.ensureDeferred
async def test_subscriber_waits_and_their_failures() -> None:
    async with PushdServer(token_secret=SECRET) as server:
        with pytest.raises(SubscribeError) as refused:
            await server.subscribe("news")  # no token
        assert refused.value.code is not None

        with pytest.raises(SubscribeError) as refused:
            await server.subscribe("news", token=token(channels=["sport"]))
        assert refused.value.frame["channel"] == "news"

        subscriber = await server.subscribe("news", "sport", token=token(channels=["*"]))
        with pytest.raises(TimeoutError):
            await subscriber.next(timeout=0.05)
        ids = [await server.publish(c, n) for n, c in enumerate(["news", "sport", "news"])]
        first = await subscriber.next()
        assert first["id"] == ids[0] and first["channel"] == "news" and first["data"] == 0
        assert [m["id"] for m in await subscriber.wait_for(3)] == ids
        assert (await subscriber.next())["data"] == 1
        assert (await subscriber.next())["data"] == 2
        assert [m["data"] for m in subscriber.messages] == [0, 1, 2]
        with pytest.raises(TimeoutError):
            await subscriber.wait_for(4, timeout=0.05)

        waiting = Deferred.fromCoroutine(subscriber.wait_for(4))
        await subscriber.close()
        with pytest.raises(ConnectionError):
            await waiting
        assert subscriber.close_status is not None and subscriber.close_status[1] == 1000
