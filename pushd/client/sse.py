"""Server-Sent Events read as a browser's EventSource reads them (HTML, 9.2.6).

`EventStreamReceiver` is the protocol to deliver a `text/event-stream` body to
(`response.deliverBody(receiver)`): lines end with CRLF, LF or CR; `event:`,
`data:` (one or more) and `id:` make an `Event`, dispatched at the empty line
to `eventReceived`; a line starting with `:` is a comment (`commentReceived`).
`retry:` and unknown fields are ignored, as is an event the stream ends inside.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

__all__ = ["Event", "EventStreamReceiver"]

_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class Event:
    """One event: its type (`message` unless `event:` said otherwise), its data
    (the `data:` lines joined by newlines) and the last event id at dispatch."""

    type: str
    data: str
    last_event_id: str


class EventStreamReceiver(Protocol):
    """Parses a `text/event-stream` body; `ended` fires (None) when it ends, however."""

    def __init__(self) -> None:
        self.last_event_id = ""
        self.ended: Deferred[None] = Deferred()
        self._buffer = b""
        self._after_cr = False  # the last line ended with CR: a LF next is its CRLF
        self._type = ""
        self._data: list[str] = []

    def eventReceived(self, event: Event) -> None:
        """Override: one event, in stream order."""

    def commentReceived(self, comment: str) -> None:
        """Override: one comment line (what follows its `:`)."""

    def dataReceived(self, data: bytes) -> None:
        if self._after_cr and data.startswith(b"\n"):
            data = data[1:]
        buffer = self._buffer + data
        self._after_cr = buffer.endswith(b"\r")
        *lines, self._buffer = _LINE_END.split(buffer)
        for line in lines:
            self._line(line.decode("utf-8", "replace"))

    def _line(self, line: str) -> None:
        if not line:
            if self._data:
                data = "\n".join(self._data)
                self.eventReceived(Event(self._type or "message", data, self.last_event_id))
            self._type, self._data = "", []
            return
        if line.startswith(":"):
            self.commentReceived(line[1:])
            return
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._type = value
        elif field == "data":
            self._data.append(value)
        elif field == "id" and "\0" not in value:
            self.last_event_id = value

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.ended.called:
            self.ended.callback(None)

    def hang_up(self) -> None:
        """Stop reading, as a browser closing the page (`connectionLost` follows)."""
        if self.transport is not None:
            self.transport.stopProducing()
