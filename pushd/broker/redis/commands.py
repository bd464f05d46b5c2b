"""The application's commands to every node (`control`, e.g. `destroy`).

They reach every node on one pub/sub channel of the subscriber connection,
`<prefix>!control` ("!" is in no channel name); each node answers on a reply
channel of its own, `<prefix>!reply:<node id>`, and the sender waits for as
many answers as PUBLISH said nodes got the command.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import Logger

from pushd.broker import Broker
from pushd.broker.redis.publisher import _log_failure
from pushd.broker.redis.scripts import DESTROY, Script
from pushd.message import dump_json, load_json

log = Logger()

CONTROL_TIMEOUT = 2.0


class _Replies:
    """The nodes' answers to one command; `all` fires once every node answered."""

    def __init__(self) -> None:
        self.count = 0
        self.expected: int | None = None
        self.all: Deferred[None] = Deferred()

    def expect(self, nodes: int) -> None:
        self.expected = nodes
        self._check()

    def add(self) -> None:
        self.count += 1
        self._check()

    def _check(self) -> None:
        if self.expected is not None and self.count >= self.expected and not self.all.called:
            self.all.callback(None)


class NodeCommands(Broker):
    """Sending the application's commands, and acting on the other nodes'."""

    # What it uses of RedisBroker (pushd.broker.redis.broker), which sets it up:
    _reactor: Any
    _prefix: str
    _pool: Any
    _meta_ttl: str
    _control_channel: str
    _reply_channel: str
    _replies: dict[str, _Replies]
    _stream: Callable[[str], str]
    _subscribers: Callable[[str], str]
    _meta: Callable[[str], str]
    _call: Callable[..., Any]
    _run: Callable[[Script, Sequence[str], Sequence[Any]], Any]

    def control(self, command: dict[str, Any]) -> Deferred[int]:
        async def run() -> int:
            if command.get("cmd") == "destroy":
                channel = command["channel"]
                keys = [self._stream(channel), self._subscribers(channel), self._meta(channel)]
                await self._run(DESTROY, keys, [self._meta_ttl])
            request = uuid.uuid4().hex
            waiting = self._replies[request] = _Replies()
            body = dump_json({**command, "id": request, "reply": self._reply_channel})
            try:
                # PUBLISH answers how many nodes got the command: wait for that many replies.
                waiting.expect(int(await self._call("publish", self._control_channel, body)))
                await waiting.all.addTimeout(CONTROL_TIMEOUT, self._reactor)
            except TimeoutError:
                log.warn("{n} nodes answered a command in time", n=waiting.count)
            finally:
                del self._replies[request]
            return waiting.count

        return self.track(Deferred.fromCoroutine(run()))

    def _command(self, name: str, raw: bytes) -> None:
        """A payload on one of pushd's own channels (`!control`, this node's
        `!reply:`): any process may PUBLISH there too, so anything that is not
        a command object is ignored."""
        body = _loads(raw)
        if not isinstance(body, dict):
            return
        request = body.get("id")
        if name == self._control_channel[len(self._prefix) :]:
            acted = self._listener.control(body)
            reply = body.get("reply")
            if (
                isinstance(reply, str)
                and reply.startswith(self._prefix + "!reply:")
                and isinstance(request, str)
            ):
                answer = dump_json({"id": request, "acted": acted})
                self._pool.publish(reply, answer).addErrback(_log_failure, "PUBLISH")
        elif name == self._reply_channel[len(self._prefix) :] and isinstance(request, str):
            waiting = self._replies.get(request)
            if waiting is not None:
                waiting.add()


def _loads(raw: bytes) -> Any:
    try:
        return load_json(raw)
    except ValueError:
        return None
