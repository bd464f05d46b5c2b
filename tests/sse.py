"""Server-Sent Events read as a browser's EventSource reads them (HTML, 9.2.6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import treq
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.web.client import ResponseFailed

from tests.support import with_timeout


@dataclass
class Event:
    type: str
    data: str
    last_event_id: str


class EventStream:
    def __init__(self) -> None:
        self.events: DeferredQueue[Event] = DeferredQueue()
        self.comments: list[str] = []
        self.last_event_id = ""
        self._buffer = b""
        self._type = ""
        self._data: list[str] = []
        self.response: Any = None
        self.ended: Deferred[Any] = Deferred()

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        while True:
            for sep in (b"\r\n", b"\n", b"\r"):
                if sep in self._buffer:
                    break
            else:
                return
            line, self._buffer = self._buffer.split(sep, 1)
            self._line(line.decode("utf-8"))

    def _line(self, line: str) -> None:
        if not line:
            if self._data:
                data = "\n".join(self._data)
                self.events.put(Event(self._type or "message", data, self.last_event_id))
            self._type, self._data = "", []
            return
        if line.startswith(":"):
            self.comments.append(line[1:].strip())
            return
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._type = value
        elif field == "data":
            self._data.append(value)
        elif field == "id" and "\0" not in value:
            self.last_event_id = value

    async def next(self, timeout: float = 10) -> Event:
        return await with_timeout(self.events.get(), timeout)

    def close(self) -> None:
        """Hang up, as a browser closing the page."""
        self.ended.addErrback(lambda f: f.trap(ResponseFailed))
        self.response.original._transport.stopProducing()


async def open_sse(url: str, headers: dict[str, str] | None = None) -> EventStream:
    stream = EventStream()
    response = await treq.get(
        url,
        headers={k: [v] for k, v in (headers or {}).items()},
        unbuffered=True,
        persistent=False,
    )
    stream.response = response
    if response.code == 200:
        stream.ended = treq.collect(response, stream.feed)
    return stream
