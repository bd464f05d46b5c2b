"""The Redis broker: one or more Redis servers (shards), and per process,
per shard, three kinds of connection.

- the publish connection (connection.py): pushd's own, on hiredis, one
  connection with commands pipelined; publishing runs there (publisher.py);
- the command pool (pool.py): `--redis-pool-size` txredisapi connections
  for history reads, subscriber counts, the application's commands;
- the subscriber connection (subscriber.py): ONE, for every channel of the
  shard this process's clients want, re-subscribed after a reconnect.

`RedisBroker` (broker.py) is the face: it routes each channel to its shard
(sharding.py) and answers for them all; a `Shard` (shard.py) makes one
Redis's connections and the parts that use them. A reader follows a message
from there:

- publisher.py: publishing (the hot path), its failures as 503/504/422;
- subscriber.py: the bus in, to `Shard.bus_message`, then the hub;
- counts.py: subscriber counts of all nodes;
- commands.py: the application's commands to every node (`control`);
- keys.py: the Redis keys and pub/sub channels;
- address.py: where Redis is (`--redis`, Sentinel, `ShardAddress`);
- scripts.py and the `.lua` files: the Lua scripts (publish.lua is also the
  backends' to run; publish_with_history.lua their checked recipe).

`from pushd.broker.redis import RedisBroker` loads it on first use: importing
txredisapi installs Twisted's default reactor (library findings, 6), and
`pushd.config` imports `address.py` from here in every process, memory
broker and `twistd --reactor=...` included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pushd.broker.redis.broker import RedisBroker

__all__ = ["RedisBroker"]


def __getattr__(name: str) -> Any:
    if name == "RedisBroker":
        from pushd.broker.redis.broker import RedisBroker

        return RedisBroker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
