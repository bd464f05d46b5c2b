"""The Redis broker: one command pool and one subscriber connection per process.

`RedisBroker` is the face; each of its jobs is a module of this package:

- scripts.py and the `.lua` files: the Lua scripts (publish.lua is also the
  backends' to run; publish_with_history.lua their checked recipe);
- publisher.py: the pool, and publishing on it (the hot path);
- subscriber.py: the subscriber connection and its re-subscribe;
- counts.py: subscriber counts of all nodes;
- commands.py: the application's commands to every node (`control`);
- address.py: where Redis is (`--redis`).

- broker.py: `RedisBroker` itself: life cycle (connecting, readiness,
  stopping), the keys of a channel, history reads, and noticing that Redis
  lost its data (epoch.lua).

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
