"""Subscribers over Server-Sent Events: `/sse` (the shared stream machinery is
pushd.transports.stream).

  GET /sse?channel=a&channel=b[&since=<id>][&token=...]   text/event-stream
      id: <id>                 (several channels: an opaque cursor of every
      data: <envelope JSON>     channel's last id, so Last-Event-ID resumes all;
                                the ids alone in the URL's channel order, see
                                pushd.transports.stream.encode_cursor)

      event: subscribed        (one per channel, before its replay; EventSource
      data: {"type":"subscribed","channel":"a","recovered":true,"position":"<id>"}
                                hands these to listeners of "subscribed")
      event: subscribed        (once every channel is live, its replay sent:
      id: <cursor>              the resume point of every channel, quiet ones
      data: {"type":"subscribed","channels":{"a":"<id>","b":"0-0"}}   included;
                                a channel without history resumes from 0-0)
      event: join              (channels of --join-leave: a member came, or
      data: {"type":"join","channel":"a","member":{..}}   `event: leave`, went)
      : keep-alive             (a comment every --keepalive seconds, 15)
"""

from __future__ import annotations

from typing import Any

from pushd.message import Burst, Delivery, Message, PresenceEvent, dump_json
from pushd.transports.stream import Stream, StreamResource, encode_cursor


class SseStream(Stream):
    """One open event stream."""

    __slots__ = ("_last",)

    def __init__(self, chunked: bool, limit: int, channels: list[str], on_slow: Any) -> None:
        super().__init__(chunked, limit, channels, on_slow)
        # Each channel's resume point (its position, then its last id), for
        # `id:`: that id itself with one channel, the cursor of all with several.
        self._last: dict[str, str] = {}

    def subscribed(self, channel: str, recovered: bool, position: str | None) -> None:
        event = dump_json(
            {"type": "subscribed", "channel": channel, "recovered": recovered, "position": position}
        )
        # Not in an `id:` yet: a replay may follow, and a browser cut off before
        # it must resume from where it was. `live` sends the cursor once replayed.
        self._last[channel] = position or "0-0"
        self._write(b"event: subscribed\ndata: " + event + b"\n\n")

    def live(self) -> None:
        """Every channel asked for is live, its replay sent: one `subscribed`
        event whose `id:` resumes every channel, quiet ones included (a channel
        without history from `0-0`, its beginning)."""
        resume = {c: self._last[c] for c in self._channels if c in self._last}
        if not resume:
            return  # no subscription went through: nothing to resume from
        one = len(self._channels) == 1
        event_id = resume[self._channels[0]] if one else encode_cursor(resume, self._channels)
        data = dump_json({"type": "subscribed", "channels": resume})
        self._write(b"event: subscribed\nid: " + event_id.encode() + b"\ndata: " + data + b"\n\n")

    def message(self, message: Delivery) -> None:
        if isinstance(message, Burst):
            # One write (one chunk, one send) for all of them.
            self._write(b"".join([self._event(one) for one in message.messages]))
        else:
            self._write(self._event(message))

    def _event(self, message: Message) -> bytes:
        if message.id is None:
            if isinstance(message, PresenceEvent):
                return b"event: " + message.event + b"\ndata: " + message.payload + b"\n\n"
            return b"data: " + message.payload + b"\n\n"
        last = self._last
        last[message.channel] = message.id
        if len(self._channels) > 1:
            cursor = encode_cursor(last, self._channels).encode()
            return b"id: " + cursor + b"\ndata: " + message.payload + b"\n\n"
        if message.channel == self._channels[0]:
            return b"id: " + message.id.encode() + b"\ndata: " + message.payload + b"\n\n"
        # The user's personal channel beside one channel: its id would be
        # taken for the channel's own on a reconnect.
        return b"data: " + message.payload + b"\n\n"

    def keepalive(self) -> None:
        self._write(b": keep-alive\n\n")


class SseResource(StreamResource):
    """`/sse`."""

    transport = "sse"
    content_type = b"text/event-stream"
    preamble = b": ok\n\n"

    def _stream(self, chunked: bool, channels: list[str], cursor: dict[str, str]) -> Stream:
        stream = SseStream(chunked, self._config.max_send_buffer, channels, self._slow_consumer)
        stream._last.update(cursor)
        return stream
