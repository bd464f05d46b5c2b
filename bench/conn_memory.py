"""Where the bytes of an idle WebSocket connection go (issue 9, "small connections").

    python bench/conn_memory.py [--conns 3000] [--top 15]

Runs pushd (memory broker) inside this process with tracemalloc on, opens
--conns idle subscribers with bench/bin/wsclient (built by bench/run.py), and
prints: the Python heap each connection holds (tracemalloc, after a full
collection), the allocation sites that hold it, the attributes left in one
protocol's own dict, and how many objects per connection only the cycle
collector can free, once they are open and once they are gone. (RSS here is
inflated by tracemalloc's own bookkeeping; bench/compare.py measures RSS.)
"""

from __future__ import annotations

import argparse
import gc
import resource
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task

from pushd.config import Config
from pushd.service import make_service

WSCLIENT = Path(__file__).parent / "bin" / "wsclient"


async def until(predicate: Any) -> None:
    while not predicate():
        await task.deferLater(reactor, 0.1, lambda: None)


def cyclic_garbage() -> Counter[str]:
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    kinds = Counter(type(o).__qualname__ for o in gc.garbage)
    gc.garbage.clear()
    gc.set_debug(0)
    return kinds


async def main(n: int, top: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cfg = Config(listen=("tcp:0:interface=127.0.0.1",), max_connections_per_ip=n + 10)
    service = make_service(cfg, reactor)
    service.startService()
    port = (await service.when_listening())[0].getHost().port
    clients = service.listeners[0].factory.ws_factory.clients

    gc.collect()
    gc.disable()  # count what only the cycle collector frees
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    cmd = [str(WSCLIENT), "--port", str(port), "--path", "/ws?channel=idle"]
    load = subprocess.Popen([*cmd, "--conns", str(n), "--idle", "--src", "127.0.0.2"])
    await until(lambda: len(clients) >= n)
    garbage = cyclic_garbage()
    after = tracemalloc.take_snapshot()
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"{n:,} idle WebSocket connections, Python heap: {total / n / 1024:.2f} KiB each")
    print(f"objects only the cycle collector frees, per open connection: "
          f"{sum(garbage.values()) / n:.1f} {dict(garbage.most_common(8))}")  # fmt: skip
    print(f"the {top} largest allocation sites (bytes and objects per connection):")
    for stat in stats[:top]:
        frame = stat.traceback[0]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        print(f"  {stat.size_diff / n:8.0f} B {stat.count_diff / n:5.1f}  {where}")
    one = next(iter(clients))
    print(f"one protocol's own dict: {sys.getsizeof(one.__dict__)} B, {len(one.__dict__)} keys:")
    print("  " + " ".join(sorted(one.__dict__)))
    tracemalloc.stop()

    load.kill()
    load.wait()
    await until(lambda: not clients)
    garbage = cyclic_garbage()
    print(f"objects only the cycle collector frees, per closed connection: "
          f"{sum(garbage.values()) / n:.1f} {dict(garbage.most_common(8))}")  # fmt: skip
    gc.enable()
    await service.stopService()


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=3000)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    if not WSCLIENT.exists():
        sys.exit("bench/bin/wsclient is missing: run bench/run.py --quick once to build it")

    def go() -> defer.Deferred[None]:
        d = defer.ensureDeferred(main(args.conns, args.top))
        d.addErrback(lambda f: f.printTraceback())
        return d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()


if __name__ == "__main__":
    run()
