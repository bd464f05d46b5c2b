"""A client that stops reading is dropped once its buffer is full; the server's
memory stays bounded and the other clients are not slowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.web.client import HTTPConnectionPool

from tests.support import Node, WSClient, connect_ws, with_timeout
from tests.test_websocket_wire import open_raw

# 20 MiB in all: twenty times --max-send-buffer, in few enough requests to be quick.
MESSAGES = 2_000
PAYLOAD = json.dumps({"pad": "x" * 10_000}).encode()  # ~10 KiB


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Counter(WSClient):
    """Counts messages instead of keeping them."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.done: Deferred[None] = Deferred()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if b'"type":"message"' in payload[:20]:
            self.count += 1
            if self.count == MESSAGES:
                self.done.callback(None)
        else:
            super().onMessage(payload, isBinary)


@pytest_twisted.ensureDeferred
async def test_a_reader_that_stops_is_dropped_and_memory_stays_bounded(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.start()
    pool = HTTPConnectionPool(reactor, persistent=True)
    try:
        await node.ready()
        assert node.process is not None
        pid = node.process.pid

        stalled = await open_raw(node, b"?channel=firehose")  # type: ignore[arg-type]
        await stalled.until(b'"subscribed"')
        stalled.transport.pauseProducing()  # never read again: the kernel buffers fill up
        healthy = await connect_ws(node.port, "/ws?channel=firehose", client_type=Counter)
        await healthy.next_of("subscribed")
        before = rss_kib(pid)
        peak = before

        async def producer(share: range) -> None:
            nonlocal peak
            for n in share:
                response = await treq.post(
                    f"{node.url}/channels/firehose", PAYLOAD,
                    headers={"content-type": ["application/json"]}, pool=pool,
                )  # fmt: skip
                await response.content()
                assert response.code == 200
                if n % 100 == 0:
                    peak = max(peak, rss_kib(pid))

        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(producer(range(k, MESSAGES, 8))) for k in range(8)]
        )
        await with_timeout(healthy.done, 30)
        peak = max(peak, rss_kib(pid))
        assert healthy.count == MESSAGES
        assert (peak - before) < 64 * 1024, f"RSS grew by {(peak - before) // 1024} MiB"
        # Reading again, the stalled client finds the server hung up long ago.
        stalled.transport.resumeProducing()
        await with_timeout(stalled.lost, 15)
        assert "dropping a slow consumer" in node.output()
        await healthy.close()
    finally:
        await pool.closeCachedConnections()
        node.stop()
