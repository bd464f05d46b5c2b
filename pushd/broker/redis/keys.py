"""The Redis keys and pub/sub channels of the Redis broker, in one place.

A channel's keys share the hash tag `{<channel>}`, so Redis Cluster would
keep them on one slot; `!` is in no channel name, so pushd's own names
(`!control`, `!reply:<node>`, `!epoch`, `!lost`, `!shards`, `!nodes`,
`!reaping`, `!presence:<node>`, `!stats`) never meet a channel's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """The names under `prefix` (`--redis-prefix`, default "pushd:")."""

    prefix: str = "pushd:"

    def bus(self, channel: str) -> str:
        """The pub/sub channel a channel's messages are PUBLISHed on."""
        return self.prefix + channel

    def history(self, channel: str) -> str:
        """The channel's history: a stream, entries linked (publish.lua)."""
        return f"{self.prefix}{{{channel}}}:history"

    def subscribers(self, channel: str) -> str:
        """Every node's subscriber count of the channel (counts.py)."""
        return f"{self.prefix}{{{channel}}}:subscribers"

    def meta(self, channel: str) -> str:
        """The channel's newest id, kept past its history (publish.lua derives it)."""
        return f"{self.prefix}{{{channel}}}:meta"

    def presence(self, channel: str) -> str:
        """The channel's members on every node: a hash, client id (`<node>.<n>`)
        -> stored member (pushd.broker.members); see presence.py."""
        return f"{self.prefix}{{{channel}}}:presence"

    def presence_channel(self, key: str) -> str | None:
        """The channel of a `presence` key; None when `key` is not one."""
        head, tail = self.prefix + "{", "}:presence"
        if key.startswith(head) and key.endswith(tail):
            return key[len(head) : -len(tail)]
        return None

    def node_presence(self, node: str) -> str:
        """The presence hashes a node has members in (a set), on each shard."""
        return f"{self.prefix}!presence:{node}"

    @property
    def nodes(self) -> str:
        """The nodes keeping presence: a sorted set, node id -> the time (ms)
        it is taken for dead unless it refreshes its entry."""
        return f"{self.prefix}!nodes"

    @property
    def reaping(self) -> str:
        """Dead nodes whose members a node is removing: node id -> the time
        (ms) another node may take the work over."""
        return f"{self.prefix}!reaping"

    def idempotency(self, key: str) -> str:
        """The answer to an Idempotency-Key's request, on its channel's shard."""
        return f"{self.prefix}idempotency:{key}"

    def idempotency_bind(self, key: str) -> str:
        """With several shards: which request an Idempotency-Key is bound to,
        on the key's own shard (bind_key.lua)."""
        return f"{self.prefix}idempotency-bind:{key}"

    @property
    def control(self) -> str:
        """The pub/sub channel of the application's commands to every node."""
        return f"{self.prefix}!control"

    def reply(self, node: str) -> str:
        """The pub/sub channel a node takes the answers to its commands on."""
        return f"{self.prefix}!reply:{node}"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}!epoch"

    @property
    def shard_map(self) -> str:
        """The shard list the nodes on this Redis use (shard_map.lua)."""
        return f"{self.prefix}!shards"

    @property
    def stats(self) -> str:
        """Every node's admin stats (a hash on the first shard, node_stats.lua)."""
        return f"{self.prefix}!stats"

    @property
    def lost(self) -> str:
        """Set once Redis was seen to have lost its data (epoch.lua)."""
        return f"{self.prefix}!lost"
