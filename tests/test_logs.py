"""Logs for machines: `--log-format json` makes every line of a real pushd's
log one JSON object (time, level, logger, message, the event's own fields),
and no secret of its configuration is in any."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure

from pushd import __version__
from pushd.logs import MASK, as_record, json_line
from tests.support import Node, connect_ws, free_port, token, wait_for

API_KEY = "api-key-that-must-never-be-logged"
TOKEN_SECRET = "token-secret-that-must-never-be-logged-000"
URL_PASSWORD = "url-password-never-logged"

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
LEVELS = {"debug", "info", "warn", "error", "critical"}


def records(text: str) -> list[dict[str, Any]]:
    """Every line of `text` as a JSON object, and each with the four fields."""
    found = []
    for line in text.splitlines():
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert TIME.fullmatch(record["time"]), line
        assert record["level"] in LEVELS, line
        assert isinstance(record["logger"], str) and record["logger"], line
        assert isinstance(record["message"], str), line
        assert not [key for key in record if key.startswith("log_")], line
        found.append(record)
    return found


def find(found: list[dict[str, Any]], logger: str, start: str) -> dict[str, Any]:
    matching = [r for r in found if r["logger"] == logger and r["message"].startswith(start)]
    assert matching, (logger, start, found)
    return matching[0]


@pytest_twisted.ensureDeferred
async def test_a_real_pushd_logs_json_lines(tmp_path: Path) -> None:
    node = Node(
        tmp_path,
        "--log-format", "json",
        "--api-key", API_KEY,
        "--token-secret", TOKEN_SECRET,
        "--access-log", "on",
        "--ping-interval", "0",
    )  # fmt: skip
    node.start()
    try:
        await wait_for(lambda: f'"url":"{node.url}/"' in node.output(), what="the banner")
        published = await treq.post(
            f"{node.url}/channels/news",
            b'"hello"',
            headers={"content-type": ["application/json"], "authorization": [f"Bearer {API_KEY}"]},
            persistent=False,
        )
        assert published.code == 200, await published.content()
        refused = await treq.post(f"{node.url}/channels/news", b'"x"', persistent=False)
        assert refused.code == 401
        await refused.content()
        subscriber = token(channels=["*"], secret=TOKEN_SECRET)
        client = await connect_ws(node.port, f"/ws?channel=news&token={subscriber}")
        await client.next_of("subscribed")
        await client.close()
        # A stream's token is in its URL, which the access log writes.
        stream = await treq.get(f"{node.url}/sse?channel=news&token=not.a.token", persistent=False)
        assert stream.code == 401, stream.code
        await stream.content()
        await wait_for(lambda: "websocket client 127.0.0.1 gone" in node.output(), what="gone")
    finally:
        await node.terminate()
    output = node.output()
    for secret in (API_KEY, TOKEN_SECRET, subscriber):
        assert secret not in output
    found = records(output)
    banner = find(found, "pushd.service", f"pushd {__version__} listening")
    assert banner["url"] == f"{node.url}/" and banner["level"] == "info", banner
    assert banner["endpoint"] == f"tcp:{node.port}:interface=127.0.0.1", banner
    admitted = find(found, "pushd.transports.websocket", "websocket client 127.0.0.1 admitted")
    assert admitted["peer"] == "127.0.0.1", admitted
    gone = find(found, "pushd.transports.websocket", "websocket client 127.0.0.1 gone")
    assert gone["code"] == 1000, gone
    refused_line = find(found, "twisted.python.log", '"127.0.0.1" - - [')
    assert '"POST /channels/news HTTP/1.1" 200' in refused_line["message"], refused_line
    streamed = [r["message"] for r in found if "/sse?" in r["message"]]
    assert streamed and "not.a.token" not in streamed[0] and "token=***" in streamed[0], streamed
    assert find(found, "twisted.scripts._twistd_unix.UnixAppLogger", "Server Shut Down")


@pytest_twisted.ensureDeferred
async def test_the_environment_and_a_log_file_take_json_too(tmp_path: Path) -> None:
    """PUSHD_LOG_FORMAT, and twistd's --logfile: the JSON lines go there."""
    log_file = tmp_path / "pushd.json"
    node = Node(tmp_path, env={"PUSHD_LOG_FORMAT": "json"}, twistd=("--logfile", str(log_file)))
    node.start()
    try:
        await node.ready()
    finally:
        await node.terminate()
    found = records(log_file.read_text())
    assert find(found, "pushd.service", f"pushd {__version__} listening")["url"] == f"{node.url}/"
    assert not node.output().strip(), node.output()


@pytest_twisted.ensureDeferred
async def test_redis_lines_in_json_show_no_password(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    node = Node(
        tmp_path, "--log-format", "json", "--redis", f"redis://:{URL_PASSWORD}@127.0.0.1:{port}"
    )
    node.start()
    try:
        await wait_for(lambda: node.output().count("unreachable") == 3, what="three kinds said")
    finally:
        await node.terminate()
    output = node.output()
    assert URL_PASSWORD not in output
    found = records(output)
    lost = find(found, "pushd.broker.redis.reachability", f"Redis 127.0.0.1:{port} unreachable")
    assert lost["level"] == "warn" and lost["shard"] == f"127.0.0.1:{port}", lost
    assert lost["reason"] == "connection refused", lost
    assert lost["kind"] in ("publish connection", "command pool", "subscriber connection"), lost


def test_a_record_is_json_safe_and_masks_secrets() -> None:
    """The shape of one event's line: fields that JSON cannot hold become
    their repr, a failure its traceback, and secrets are masked wherever."""
    events: list[dict[str, Any]] = []
    log = Logger(namespace="pushd.test", observer=events.append)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure(
            "publish of {channel} failed for {secret_holder}",
            Failure(),
            channel="news",
            secret_holder=f"Bearer {API_KEY}",
            count=3,
            ratio=float("nan"),
            where=(1, "a"),
            thing=object(),
            raw=b"\xff",
            api_key=API_KEY,
            password="hunter2",
        )
    [event] = events
    record = json.loads(json_line(event, [API_KEY]))
    assert record["level"] == "critical" and record["logger"] == "pushd.test"
    assert record["message"] == f"publish of news failed for Bearer {MASK}"
    assert record["channel"] == "news" and record["count"] == 3 and record["ratio"] == "nan"
    assert record["where"] == [1, "a"] and record["thing"].startswith("<object object at")
    assert record["raw"] == "\\xff"
    assert record["api_key"] == MASK and record["password"] == MASK
    assert "ZeroDivisionError" in record["failure"] and "Traceback" in record["failure"]
    assert not [key for key in record if key.startswith("log_")], record
    assert TIME.fullmatch(record["time"]), record
    # A secret made of JSON's own characters is masked in the values: the line stays JSON.
    quoted = '","'
    log.info("{a}", a=f"x{quoted}y", b=[quoted])
    assert json.loads(json_line(events[-1], [quoted]))["b"] == [MASK]


def test_a_record_of_a_legacy_event_has_its_text() -> None:
    """An event of twisted.python.log (what libraries still use) as a record:
    its text, none of the legacy keys."""
    from twisted.logger import globalLogPublisher
    from twisted.python import log as legacy

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        legacy.msg("something happened", system="x")
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if e.get("log_text") == "something happened"]
    record = as_record(event)
    assert record["message"] == "something happened" and record["logger"] == "log_legacy", record
    assert not {"system", "isError", "format", "message_", "time_"} & set(record), record


def test_a_legacy_error_is_its_traceback() -> None:
    """`twisted.python.log.err`, as Twisted and txredisapi still call it: the
    failure's traceback as `failure`, the reason in the message."""
    from twisted.logger import globalLogPublisher
    from twisted.python import log as legacy

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        legacy.err(Failure(ValueError("bad value")), "while reading")
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if "log_failure" in e or "failure" in e]
    record = as_record(event)
    assert "while reading" in record["message"], record
    assert "ValueError: bad value" in record["failure"], record
    assert not {"why", "isError", "failure_"} & set(record), record


def test_the_libraries_chatter_is_left_out() -> None:
    """What Twisted's and txredisapi's own code says in their words, through
    the observer pushd's log uses (text or JSON), is left out; the rest stays."""
    from twisted.internet.protocol import Factory
    from twisted.logger import globalLogPublisher
    from twisted.python import log as legacy

    from pushd.logs import quiet

    events: list[dict[str, Any]] = []
    observer = quiet(events.append)
    globalLogPublisher.addObserver(observer)
    try:
        noisy = Factory()
        noisy.noisy = True
        noisy.doStart()
        noisy.doStop()
        legacy.msg("PushdSite starting on 8080")
        legacy.msg("(TCP Port 8080 Closed)")
        legacy.msg("Discarding dead connection.")
        legacy.msg("Redis error: could not auth: WRONGPASS invalid username-password pair")
        legacy.msg("kept")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert [formatEvent(e) for e in events] == ["kept"], [formatEvent(e) for e in events]
