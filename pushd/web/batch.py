"""Producers' other ways in: a batch (`POST /publish`) and the nginx+Lua
gateway's contract (`POST /push?c=`)."""

from __future__ import annotations

import time
from collections.abc import Coroutine
from random import getrandbits
from typing import Any

from twisted.logger import Logger
from twisted.web.server import Request

from pushd.message import data_json, dump_json, has_long_numbers, is_channel, load_json
from pushd.web import errors
from pushd.web.errors import ApiError
from pushd.web.producer import Producing, idempotency_key, query_value, read_body
from pushd.web.resource import ApiResource

log = Logger()


def _where(line: int | None) -> str:
    return f" (line {line})" if line is not None else ""


def _items_of(obj: Any, line: int | None, max_message_size: int) -> list[tuple[str, bytes]]:
    if not isinstance(obj, dict) or "data" not in obj:
        raise ApiError(400, "bad_batch", f'each message is an object with "data"{_where(line)}')
    if "channels" in obj:
        channels = obj["channels"]
        if not isinstance(channels, list) or not channels:
            raise ApiError(400, "bad_batch", f'"channels" is a list of channel names{_where(line)}')
    elif "channel" in obj:
        channels = [obj["channel"]]
    else:
        raise ApiError(400, "bad_batch", f'a message names "channel" or "channels"{_where(line)}')
    if not all(isinstance(c, str) and is_channel(c) for c in channels):
        raise ApiError(400, "bad_channel", f"invalid channel name{_where(line)}")
    try:
        data = data_json(obj["data"])
    except ValueError:
        raise ApiError(400, "bad_json", f"the data is not valid Unicode{_where(line)}") from None
    if len(data) > max_message_size:
        raise ApiError(
            413, "too_large", f"a message is larger than --max-message-size{_where(line)}"
        )
    return [(channel, data) for channel in channels]


def parse_batch(body: bytes, content_type: str, max_message_size: int) -> list[tuple[str, bytes]]:
    """Every (channel, data) of a batch, or ApiError for the first bad part."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(*errors.BAD_TEXT) from None
    ctype = content_type.split(";", 1)[0].strip().lower()
    items: list[tuple[str, bytes]] = []
    if ctype in ("application/x-ndjson", "application/jsonl", "application/json-seq"):
        checked = not has_long_numbers(body)  # once for every line
        # Lines end at LF (CRLF too): not at what str.splitlines also takes for
        # one, U+2028 or U+0085, which a JSON string may hold as it is.
        for n, line in enumerate(text.split("\n"), start=1):
            # application/json-seq (RFC 7464) starts each record with RS.
            line = line.removeprefix("\x1e")
            if not line.strip():
                continue
            try:
                obj = load_json(line, no_long_numbers=checked)
            except ValueError:
                raise ApiError(400, "bad_json", f"line {n} is not valid JSON") from None
            items.extend(_items_of(obj, n, max_message_size))
    else:
        try:
            obj = load_json(text)
        except ValueError:
            raise ApiError(*errors.BAD_JSON) from None
        items.extend(_items_of(obj, None, max_message_size))
    if not items:
        raise ApiError(400, "bad_batch", "the batch has no message")
    return items


class PublishResource(ApiResource):
    """`POST /publish`: one message to many channels, or many messages, all or nothing."""

    def __init__(self, producing: Producing) -> None:
        super().__init__()
        self._p = producing

    async def _publish(self, items: list[tuple[str, bytes]], key: str | None) -> bytes:
        d = self._p.broker.publish_many(items, key)
        published = await self._p.publish("publish", d, len(items))
        names: dict[str, bytes] = {}
        results = []
        for (channel, _), p in zip(items, published, strict=True):
            name = names.get(channel)
            if name is None:
                name = names[channel] = b'{"channel":' + dump_json(channel) + b',"id":"'
            results.append(name + p.id.encode() + b'"}')
        return b'{"results":[' + b",".join(results) + b"]}"

    def handle_POST(self, request: Request) -> Coroutine[Any, Any, bytes]:
        self._p.auth.check(request)
        key = idempotency_key(request)
        body = read_body(request, self._p.config.max_batch_size)
        ctype = (request.getHeader(b"content-type") or b"").decode("latin-1")
        items = parse_batch(body, ctype, self._p.config.max_message_size)
        return self._publish(items, key)


# What a JSON text can start with (RFC 8259: a value, after whitespace).
_JSON_STARTS = frozenset('{["-0123456789tfn')


def push_data(body: bytes) -> bytes:
    """What subscribers get of a `/push` body: its JSON, or it as a JSON string.
    ValueError when it is not UTF-8."""
    text = body.decode("utf-8")
    if text.lstrip(" \t\r\n")[:1] not in _JSON_STARTS:
        return dump_json(text)  # not JSON: spares a parse that would raise
    try:
        return data_json(load_json(text))
    except ValueError:
        return dump_json(text)


def push_entry(body: bytes) -> tuple[int, str, bytes]:
    """The gateway's list entry `<ms>|<request id>|<body>`, with its two parts."""
    ms = int(time.time() * 1000)
    # Random, as nginx's $request_id is: an id for logs, not a secret (no syscall).
    request_id = f"{getrandbits(128):032x}"
    return ms, request_id, f"{ms}|{request_id}|".encode() + body


class PushResource(ApiResource):
    """`POST /push?c=<channel>`, the nginx+Lua gateway's contract, for drop-in use.

    Answers `text/plain`: `S|<ms timestamp>|<request id>` or `F|<reason>`. In one
    MULTI/EXEC it runs `LPUSH <channel> "<ms>|<request id>|<body>"` and
    `LPUSH <event list> <channel>`, then delivers the body live like any
    publish (history included). The memory broker keeps no lists: it says so in
    a `Warning` header and still delivers.
    """

    def __init__(self, producing: Producing) -> None:
        super().__init__()
        self._p = producing

    content_type = b"text/plain; charset=utf-8"

    def error_body(self, error: ApiError) -> bytes:
        # The gateway's clients read `F|<reason>`, not the JSON errors.
        return f"F|{error.message}".encode()

    def handle_POST(self, request: Request) -> Coroutine[Any, Any, bytes]:
        self._p.auth.check(request)
        channel = query_value(request, b"c")
        if channel is None or not is_channel(channel):
            raise ApiError(400, "bad_channel", "bad channel name")
        body = read_body(request, self._p.config.max_message_size)
        try:
            data = push_data(body)
        except ValueError:
            raise ApiError(400, "bad_text", "the body is not UTF-8") from None
        return self._push(request, channel, body, data)

    async def _push(self, request: Request, channel: str, body: bytes, data: bytes) -> bytes:
        ms, request_id, entry = push_entry(body)
        d = self._p.broker.push(channel, entry, self._p.config.push_event_list, data)
        try:
            kept, _ = await self._p.publish("push", d)
        except ApiError as e:
            if e.status == errors.OUTCOME_UNKNOWN.status:
                raise ApiError(
                    504, "outcome_unknown", "redis did not answer: outcome unknown"
                ) from None
            raise ApiError(503, "unavailable", "redis unavailable") from None
        if not kept:
            request.setHeader(b"warning", b'299 pushd "memory broker: no Redis lists kept"')
        return f"S|{ms}|{request_id}".encode()
