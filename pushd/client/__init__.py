"""pushd's client side: a Python client on Twisted, and the `pushd-cli` and
`pushd-check` console scripts.

    from pushd.client import Publisher, Subscriber

    publisher = Publisher("http://127.0.0.1:8080", api_key="k")
    msg_id = await publisher.publish("news", {"headline": "pushd is up"})
    await publisher.close()

    async with Subscriber("http://127.0.0.1:8080", ["news"]) as subscriber:
        async for envelope in subscriber:  # {"type": "message", "channel", "id", "data"}
            print(envelope["data"])

Everything runs on the Twisted reactor: await these coroutines from
`Deferred.fromCoroutine`, `twisted.internet.task.react` or pytest-twisted.

- `publisher.py`: `Publisher` (HTTP, retried under one `Idempotency-Key`; `presence()`)
  and `PushdError`.
- `subscriber.py`: `Subscriber` (WebSocket, resumed after a lost connection; `presence()`,
  `on_join`, `on_leave`).
- `sse.py`: a Server-Sent Events reader, as a browser's EventSource reads them.
- `cli.py` (`pushd-cli`), `check.py` (`pushd-check`): the console scripts, and
  `console.py`, what they share (the target URL, argument types, the reason a
  connection failed, running on the reactor). The library modules import none of
  the scripts.
"""

from pushd.client.publisher import Publisher, PushdError
from pushd.client.subscriber import Subscriber

__all__ = ["Publisher", "PushdError", "Subscriber"]
