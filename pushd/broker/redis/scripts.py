"""The Lua scripts of the Redis broker, one `.lua` file each in this package,
run with EVALSHA (loaded again after a NOSCRIPT: Redis restarted, SCRIPT FLUSH).

publish.lua is the one backends run too (README, "Redis layout");
publish_with_history.lua is the backends' recipe, around a verbatim copy of
publish.lua (`python -m tests.test_bus` copies it in); pushd itself does not run it.
"""

from __future__ import annotations

import hashlib
from importlib.resources import files


class Script:
    """A script's source and SHA1; `name` is its file's (`publish.lua`), for metrics."""

    def __init__(self, source: str, name: str) -> None:
        self.source = source
        self.name = name
        self.sha = hashlib.sha1(source.encode()).hexdigest()


def source(name: str) -> str:
    """The text of `<name>.lua` in this package."""
    return (files(__package__) / f"{name}.lua").read_text()


_PUBLISH_LUA = source("publish")

PUBLISH = Script(_PUBLISH_LUA, "publish.lua")
PUBLISH_MANY = Script(source("publish_many"), "publish_many.lua")
# push.lua calls publish.lua as a function.
PUSH = Script(
    "local function publish(KEYS, ARGV)\n" + _PUBLISH_LUA + "end\n" + source("push"), "push.lua"
)
READ_AFTER = Script(source("read_after"), "read_after.lua")
DESTROY = Script(source("destroy"), "destroy.lua")
EPOCH = Script(source("epoch"), "epoch.lua")
REPORT_COUNTS = Script(source("report_counts"), "report_counts.lua")
COUNT = Script(source("count"), "count.lua")
SHARD_MAP = Script(source("shard_map"), "shard_map.lua")
BIND_KEY = Script(source("bind_key"), "bind_key.lua")
PRESENCE_UPDATE = Script(source("presence_update"), "presence_update.lua")
PRESENCE_READ = Script(source("presence_read"), "presence_read.lua")
PRESENCE_CLAIM = Script(source("presence_claim"), "presence_claim.lua")
PRESENCE_DROP = Script(source("presence_drop"), "presence_drop.lua")
NODE_STATS = Script(source("node_stats"), "node_stats.lua")
