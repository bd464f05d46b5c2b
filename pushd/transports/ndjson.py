"""Subscribers over a newline-delimited JSON stream: `/stream` (the shared
stream machinery is pushd.transports.stream).

  GET /stream?channel=a[&since=<id>][&token=...]            application/x-ndjson
      {"type":"subscribed","channel":"a","recovered":false,"position":null}
      {"type":"message","channel":"a","id":"...","data":...}
      (an empty line every --keepalive seconds keeps proxies from timing out
       the stream: readers skip empty lines)
"""

from __future__ import annotations

from pushd.message import Burst, Delivery, dump_json
from pushd.transports.stream import Stream, StreamResource


class NdjsonStream(Stream):
    """One open NDJSON stream: a line per server event."""

    __slots__ = ()

    def subscribed(self, channel: str, recovered: bool, position: str | None) -> None:
        event = dump_json(
            {"type": "subscribed", "channel": channel, "recovered": recovered, "position": position}
        )
        self._write(event + b"\n")

    def message(self, message: Delivery) -> None:
        if isinstance(message, Burst):
            # One write (one chunk, one send) for all of them.
            self._write(b"".join([one.payload + b"\n" for one in message.messages]))
            return
        self._write(message.payload + b"\n")

    def keepalive(self) -> None:
        self._write(b"\n")


class NdjsonResource(StreamResource):
    """`/stream`."""

    transport = "stream"
    content_type = b"application/x-ndjson"

    def _stream(self, chunked: bool, channels: list[str], cursor: dict[str, str]) -> Stream:
        return NdjsonStream(chunked, self._config.max_send_buffer, channels, self._slow_consumer)
