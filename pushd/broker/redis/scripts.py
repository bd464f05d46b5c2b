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
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


def source(name: str) -> str:
    """The text of `<name>.lua` in this package."""
    return (files(__package__) / f"{name}.lua").read_text()


_PUBLISH_LUA = source("publish")

PUBLISH = Script(_PUBLISH_LUA)
PUBLISH_MANY = Script(source("publish_many"))
# push.lua calls publish.lua as a function.
PUSH = Script("local function publish(KEYS, ARGV)\n" + _PUBLISH_LUA + "end\n" + source("push"))
READ_AFTER = Script(source("read_after"))
DESTROY = Script(source("destroy"))
EPOCH = Script(source("epoch"))
REPORT_COUNTS = Script(source("report_counts"))
COUNT = Script(source("count"))
SHARD_MAP = Script(source("shard_map"))
BIND_KEY = Script(source("bind_key"))
PRESENCE_UPDATE = Script(source("presence_update"))
PRESENCE_READ = Script(source("presence_read"))
PRESENCE_CLAIM = Script(source("presence_claim"))
PRESENCE_DROP = Script(source("presence_drop"))
NODE_STATS = Script(source("node_stats"))
