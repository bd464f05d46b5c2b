"""The tests' SSE client: pushd's own reader (`pushd.client.sse`) with a queue."""

from __future__ import annotations

from typing import Any

import treq
from twisted.internet.defer import DeferredQueue

from pushd.client.sse import Event, EventStreamReceiver
from tests.support import with_timeout

__all__ = ["Event", "EventStream", "open_sse"]


class EventStream(EventStreamReceiver):
    """A stream's events, queued; its comments; `ended` fires when it ends."""

    def __init__(self) -> None:
        super().__init__()
        self.events: DeferredQueue[Event] = DeferredQueue()
        self.comments: list[str] = []
        self.response: Any = None

    def eventReceived(self, event: Event) -> None:
        self.events.put(event)

    def commentReceived(self, comment: str) -> None:
        self.comments.append(comment.strip())

    async def next(self, timeout: float = 10) -> Event:
        return await with_timeout(self.events.get(), timeout)

    def close(self) -> None:
        """Hang up, as a browser closing the page."""
        self.hang_up()


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
        response.deliverBody(stream)
    return stream
