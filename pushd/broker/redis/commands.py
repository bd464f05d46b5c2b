"""The application's commands to every node (`control`, e.g. `destroy`).

They reach every node on one pub/sub channel of the subscriber connection,
`<prefix>!control` ("!" is in no channel name); each node answers on a reply
channel of its own, `<prefix>!reply:<node id>`, and the sender waits for as
many answers as PUBLISH said nodes got the command.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pushd.broker.redis.keys import Keys
from pushd.broker.redis.pool import CommandPool
from pushd.broker.redis.scripts import DESTROY
from pushd.broker.redis.subscriber import log_failure
from pushd.message import dump_json, load_json

log = Logger()

#: Seconds a command waits for the nodes' answers.
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


class NodeCommands:
    """Sending the application's commands, and acting on the other nodes'
    (`act`: the hub's BusListener.control, answering how many clients it acted on)."""

    def __init__(
        self,
        pool: CommandPool,
        keys: Keys,
        node: str,
        act: Callable[[dict[str, Any]], int],
        *,
        reactor: IReactorTime,
        meta_ttl: int,
    ) -> None:
        self._reactor = reactor
        self._pool = pool
        self._keys = keys
        self._meta_ttl = meta_ttl
        self._act = act
        self.channels = (keys.control, keys.reply(node))
        self._replies: dict[str, _Replies] = {}

    async def control(self, command: dict[str, Any]) -> int:
        keys = self._keys
        if command.get("cmd") == "destroy":
            channel = command["channel"]
            streams = [keys.history(channel), keys.subscribers(channel), keys.meta(channel)]
            await self._pool.run(DESTROY, streams, [self._meta_ttl])
        request = uuid.uuid4().hex
        waiting = self._replies[request] = _Replies()
        control, reply = self.channels
        body = dump_json({**command, "id": request, "reply": reply})
        try:
            # PUBLISH answers how many nodes got the command: wait for that many replies.
            waiting.expect(int(await self._pool.call("publish", control, body)))
            await waiting.all.addTimeout(CONTROL_TIMEOUT, self._reactor)
        except TimeoutError:
            log.warn("{n} nodes answered a command in time", n=waiting.count)
        finally:
            del self._replies[request]
        return waiting.count

    def received(self, channel: str, raw: bytes) -> None:
        """A payload on one of pushd's own channels (`channels`): any process
        may PUBLISH there too, so anything that is not a command object is
        ignored."""
        body = _loads(raw)
        if not isinstance(body, dict):
            return
        request = body.get("id")
        control, own_reply = self.channels
        if channel == control:
            acted = self._act(body)
            reply = body.get("reply")
            if (
                isinstance(reply, str)
                and reply.startswith(self._keys.prefix + "!reply:")
                and isinstance(request, str)
            ):
                answer = dump_json({"id": request, "acted": acted})
                self._pool.redis.publish(reply, answer).addErrback(log_failure, "PUBLISH")
        elif channel == own_reply and isinstance(request, str):
            waiting = self._replies.get(request)
            if waiting is not None:
                waiting.add()


def _loads(raw: bytes) -> Any:
    try:
        return load_json(raw)
    except ValueError:
        return None
