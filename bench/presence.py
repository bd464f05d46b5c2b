#!/usr/bin/env python3
"""What presence costs: a presence channel of 10,000 members across 2 pushd nodes.

    python bench/presence.py [--members 10000] [--rounds 3] [--queries 50] [--join-leave]

Starts one redis-server and, on it, pushd nodes (`twistd -n pushd`, Redis broker):
two with `--presence 'room:*'`, two without (the peer: the same channel, subscriber
counts only), one more with `--presence 'room:*' --max-presence-list 10000` that holds
no connection and only answers queries (and, with --join-leave, two with
`--join-leave 'room:*'`). Every node runs with `--ping-interval 0` (no WebSocket
pings during the measurements); otherwise their defaults. Servers on CPU 0, the
load (bench/bin/wsclient, this driver) on CPU 1.

Each round, for each pair in turn (the order alternates between rounds):
`--members` WebSockets to `/ws?channel=room:1`, half on each node (one wsclient
process per node), then all of them closed. Measured over each phase, until the
servers are still again: the pair's CPU (/proc/PID/stat utime + stime) and Redis's
(INFO cpu, used_cpu_sys + used_cpu_user), less what the same processes use idle
(measured just before) -> us per connect and per disconnect; Redis's used_memory
before and with every member in (INFO memory) and MEMORY USAGE of the presence hash
(and of the subscriber counts hash) -> bytes per member. With the members in, on the
presence pair: `--queries` GET /channels/room:1/presence, one after another on one
keep-alive connection, to a node of the pair (--max-presence-list 1000, the default)
and to the query node (10000): latency median and p99, and Redis's own time of each
read script call (SLOWLOG, threshold 0, the EVALSHA calls of the presence read).

Prints the table; logs go to bench/out/presence/, the raw figures to
bench/out/presence.json and the printed output to bench/out/presence.txt. See
bench/README.md ("Presence costs"). Reuses bench/run.py's machinery.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import io
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as R  # bench/run.py

ROOT = R.ROOT
OUT = R.OUT / "presence"
RESULTS = R.OUT / "presence.json"
TEXT = R.OUT / "presence.txt"
PATTERN = "room:*"
CHANNEL = "room:1"
say = R.say
BenchError = R.BenchError
PROBLEMS: list[str] = []
COMMON = ["--ping-interval", "0"]  # no pings during the measurements (same for every node)
CONFIGS = {
    "none": [],
    "presence": ["--presence", PATTERN],
    "join-leave": ["--join-leave", PATTERN],
}
LABELS = {
    "none": "no presence",
    "presence": "--presence",
    "join-leave": "--join-leave",
}

SECRET = "bench-presence-secret"


def token(user: str) -> str:
    """An HS256 token (what pushd's --token-secret checks): `sub`, a short `info`, the
    room channels, an hour to live."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(b'{"alg":"HS256","typ":"JWT"}')
    claims = {"sub": user, "info": {"name": user.title()}, "channels": [PATTERN],
              "exp": int(time.time()) + 3600}  # fmt: skip
    body = b64(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


# ---------------------------------------------------------------- Redis


class Resp:
    """A minimal Redis client (RESP2) on one connection: what the driver asks Redis."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.file = self.sock.makefile("rb")

    def __call__(self, *args: Any) -> Any:
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(out))
        return self._read()

    def _read(self) -> Any:
        line = self.file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise BenchError(f"Redis: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.file.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise BenchError(f"Redis: unexpected reply {line[:80]!r}")

    def info(self, section: str) -> dict[str, str]:
        text = self("INFO", section).decode()
        return dict(
            line.split(":", 1) for line in text.splitlines() if ":" in line and line[0] != "#"
        )

    def cpu(self) -> float:
        i = self.info("cpu")
        return float(i["used_cpu_sys"]) + float(i["used_cpu_user"])

    def used_memory(self) -> tuple[int, int]:
        """(used_memory, used_memory less the clients' buffers, mem_clients_normal)."""
        i = self.info("memory")
        return int(i["used_memory"]), int(i["used_memory"]) - int(i["mem_clients_normal"])

    def key_bytes(self, key: str) -> int:
        return int(self("MEMORY", "USAGE", key, "SAMPLES", "0") or 0)


# ---------------------------------------------------------------- measuring


class Meter:
    """CPU seconds of a pair of pushd nodes and of Redis over a phase."""

    def __init__(self, pids: list[int], redis: Resp) -> None:
        self.pids = pids
        self.redis = redis
        self.t = time.monotonic()
        self.pushd0 = [R.cpu_seconds(p) for p in pids]
        self.redis0 = redis.cpu()

    def read(self) -> tuple[float, float, float]:
        """(pushd s, summed over the pair; redis s; wall s) since the start."""
        pushd = sum(R.cpu_seconds(p) - c for p, c in zip(self.pids, self.pushd0, strict=True))
        return pushd, self.redis.cpu() - self.redis0, time.monotonic() - self.t


def idle_rate(pids: list[int], redis: Resp, seconds: float) -> tuple[float, float]:
    """CPU seconds per second of the pair and of Redis with nothing to do (their
    ticks: subscriber counts, presence refresh and reaping)."""
    m = Meter(pids, redis)
    time.sleep(seconds)
    pushd, red, wall = m.read()
    return pushd / wall, red / wall


def wait_still(pids: list[int], redis: Resp, limit: float, what: str) -> float:
    """Until the pair used at most 2 ticks (20 ms) of CPU in each of two 0.5 s
    windows in a row: what a phase set going is done. Returns the seconds waited."""
    t0 = time.monotonic()
    calm = 0
    while calm < 2:
        before = sum(R.cpu_seconds(p) for p in pids)
        time.sleep(0.5)
        used = sum(R.cpu_seconds(p) for p in pids) - before
        calm = calm + 1 if used <= 0.02 else 0
        if time.monotonic() - t0 > limit:
            PROBLEMS.append(f"{what}: the servers were still busy after {limit:.0f}s")
            say(f"  {what}: the servers are still busy after {limit:.0f}s; measuring anyway")
            break
    return time.monotonic() - t0


def phase_figures(
    meter: Meter, idle: tuple[float, float], n: int, cpu: R.CpuMeter, name: str
) -> dict[str, Any]:
    pushd_s, redis_s, wall = meter.read()
    _, _, other = cpu.percent(name)
    pushd_net = max(0.0, pushd_s - idle[0] * wall)
    redis_net = max(0.0, redis_s - idle[1] * wall)
    return {
        "wall_s": wall,
        "pushd_cpu_s": pushd_s,
        "redis_cpu_s": redis_s,
        "pushd_idle_s": idle[0] * wall,
        "redis_idle_s": idle[1] * wall,
        "pushd_us_each": 1e6 * pushd_net / n,
        "redis_us_each": 1e6 * redis_net / n,
        "other_cpu0_percent": other,
    }


# ---------------------------------------------------------------- queries


def presence_path(channel: str = CHANNEL) -> str:
    return f"/channels/{channel}/presence"


def query_times(port: int, n: int) -> tuple[list[float], dict[str, Any]]:
    """n GETs of the presence of CHANNEL, one after another on one keep-alive
    connection: each one's latency (ms), and the last answer."""

    async def go() -> tuple[list[float], dict[str, Any]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 24)
        times, answer = [], b""
        try:
            for _ in range(n):
                t = time.perf_counter()
                status, answer = await R._request(reader, writer, port, presence_path())
                times.append(1000 * (time.perf_counter() - t))
                if status != 200:
                    raise BenchError(f"GET {presence_path()} answered {status}: {answer[:200]!r}")
        finally:
            writer.close()
        return times, json.loads(answer)

    return asyncio.run(asyncio.wait_for(go(), 60 + n))


def pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))] if s else 0.0


def slowlog_reads(redis: Resp, key: str) -> list[int]:
    """Redis's own time (us) of each presence read of `key` in the slow log (the
    EVALSHA calls whose first key is the presence hash and second the nodes' set)."""
    found = []
    for entry in redis("SLOWLOG", "GET", "-1") or []:
        args = entry[3]
        if (
            len(args) >= 5
            and args[0].upper() in (b"EVALSHA", b"EVAL")
            and args[2] == b"2"
            and args[3] == key.encode()
            and args[4] == b"pushd:!nodes"
        ):
            found.append(int(entry[2]))
    return found


def measure_queries(
    redis: Resp, port: int, n: int, limit: int, members: int, name: str
) -> dict[str, Any]:
    R.wait_quiet()
    redis("CONFIG", "SET", "slowlog-max-len", "4096")
    redis("CONFIG", "SET", "slowlog-log-slower-than", "0")
    redis("SLOWLOG", "RESET")
    try:
        times, answer = query_times(port, n)
        redis_us = slowlog_reads(redis, f"pushd:{{{CHANNEL}}}:presence")
    finally:
        redis("CONFIG", "SET", "slowlog-log-slower-than", "10000")
        redis("SLOWLOG", "RESET")
    listed = len(answer.get("clients", []))
    if answer.get("count") != members or listed != min(limit, members):
        PROBLEMS.append(
            f"{name}: presence answered count {answer.get('count')} and {listed} clients, "
            f"not {members} and {min(limit, members)}"
        )
    body = len(json.dumps(answer, separators=(",", ":")))
    out = {
        "queries": n,
        "max_presence_list": limit,
        "count": answer.get("count"),
        "listed": listed,
        "body_bytes": body,
        "ms": times,
        "p50_ms": statistics.median(times),
        "p99_ms": pct(times, 0.99),
        "redis_us": redis_us,
        "redis_p50_us": statistics.median(redis_us) if redis_us else 0.0,
        "redis_p99_us": pct(redis_us, 0.99) if redis_us else 0.0,
    }
    if len(redis_us) < n:
        PROBLEMS.append(f"{name}: {len(redis_us)} presence reads in Redis's slow log, not {n}")
    say(
        f"  {name}: {n} queries, count {out['count']:,}, {listed:,} listed "
        f"({body / 1024:.0f} KiB): "
        f"p50 {out['p50_ms']:.2f} ms p99 {out['p99_ms']:.2f} ms; Redis's read script "
        f"p50 {out['redis_p50_us']:,.0f} us p99 {out['redis_p99_us']:,.0f} us"
    )
    return out


# ---------------------------------------------------------------- one pair, one round


def ws_path(args: argparse.Namespace, i: int) -> str:
    """The clients' URL path; with --token, each node's clients are one user (a
    wsclient process has one path)."""
    path = f"/ws?channel={CHANNEL}"
    return path + f"&token={token(f'user-{i}')}" if args.token else path


def run_pair(
    config: str,
    nodes: list[R.Pushd],
    redis: Resp,
    members: int,
    args: argparse.Namespace,
    tag: str,
    query: R.Pushd | None,
) -> dict[str, Any]:
    pids = [p.pid for p in nodes]
    hash_key = f"pushd:{{{CHANNEL}}}:presence"
    counts_key = f"pushd:{{{CHANNEL}}}:subscribers"
    per_node = [members // len(nodes) + (1 if i < members % len(nodes) else 0)
                for i in range(len(nodes))]  # fmt: skip
    fds0 = [R.open_fds(p) for p in pids]
    R.wait_quiet()
    idle = idle_rate(pids, redis, args.idle_seconds)
    mem0, data0 = redis.used_memory()
    row: dict[str, Any] = {"config": config, "idle_pushd_per_s": idle[0],
                           "idle_redis_per_s": idle[1], "used_memory_before": mem0,
                           "used_memory_less_clients_before": data0}  # fmt: skip

    # connects
    say(f"{tag}: {members:,} connects to {CHANNEL} ({' + '.join(map(str, per_node))} on "
        f"nodes {', '.join(str(p.pid) for p in nodes)})")  # fmt: skip
    cpu = R.CpuMeter(pids, redis_pid(), pinned=True)
    meter = Meter(pids, redis)
    sets = [
        R.ClientSet(p.port, f"{tag}-n{i}", k, ws_path(args, i), idle=True,
                    rate=args.connect_rate)
        for i, (p, k) in enumerate(zip(nodes, per_node, strict=True))
    ]  # fmt: skip
    held = sum(s.wait_ready() for s in sets)
    connect_wall = time.monotonic() - meter.t
    tail = wait_still(pids, redis, args.settle_limit, f"{tag} connect")
    row["connect"] = phase_figures(meter, idle, held, cpu, f"{tag} connect")
    row["connect"].update(held=held, ready_s=connect_wall, tail_s=tail,
                          connects_per_s=held / connect_wall)  # fmt: skip
    if held != members:
        PROBLEMS.append(f"{tag}: {held:,} of {members:,} connections subscribed")
    for p in nodes:
        p.alive()

    # memory, with every member in
    mem1, data1 = redis.used_memory()
    row["used_memory_held"] = mem1
    row["used_memory_less_clients_held"] = data1
    row["bytes_per_member"] = (mem1 - mem0) / held if held else 0.0
    row["data_bytes_per_member"] = (data1 - data0) / held if held else 0.0
    row["hash_bytes"] = redis.key_bytes(hash_key)
    row["hash_fields"] = int(redis("HLEN", hash_key))
    row["hash_encoding"] = (redis("OBJECT", "ENCODING", hash_key) or b"-").decode() \
        if row["hash_fields"] else "-"  # fmt: skip
    row["hash_bytes_per_member"] = row["hash_bytes"] / held if held else 0.0
    row["counts_hash_bytes"] = redis.key_bytes(counts_key)
    if config != "none" and row["hash_fields"] != held:
        PROBLEMS.append(f"{tag}: the presence hash has {row['hash_fields']:,} fields, not {held:,}")
    if config == "none" and row["hash_fields"]:
        PROBLEMS.append(f"{tag}: a presence hash without --presence ({row['hash_fields']} fields)")
    c = row["connect"]
    say(f"  connects: {held:,} subscribed in {connect_wall:.1f}s ({c['connects_per_s']:,.0f}/s, "
        f"then {tail:.1f}s until still): pushd {c['pushd_us_each']:.0f} us, Redis "
        f"{c['redis_us_each']:.1f} us per connect; Redis used_memory "
        f"+{(mem1 - mem0) / 1024:,.0f} KiB = {row['bytes_per_member']:.0f} B per member "
        f"({row['data_bytes_per_member']:.0f} B less clients' buffers); presence hash "
        f"{row['hash_bytes'] / 1024:,.0f} KiB ({row['hash_fields']:,} fields, "
        f"{row['hash_encoding']}), subscriber counts hash "
        f"{row['counts_hash_bytes']} B")  # fmt: skip

    # queries
    if query is not None and config != "none":
        row["query_default"] = measure_queries(
            redis, nodes[0].port, args.queries, 1000, held, f"{tag} GET presence (list 1000)"
        )
        row["query_10000"] = measure_queries(
            redis, query.port, args.queries, 10000, held, f"{tag} GET presence (list 10000)"
        )

    # disconnects
    R.wait_quiet()
    cpu = R.CpuMeter(pids, redis_pid(), pinned=True)
    meter = Meter(pids, redis)
    for s in sets:
        for child in s.children:
            child.send("quit")
    finals = []
    for s in sets:
        for child in s.children:
            finals.append(child.json(30))
            child.stop()
    dropped = sum(f.get("closed_by_server", 0) for f in finals)
    if dropped:
        PROBLEMS.append(f"{tag}: the nodes closed {dropped:,} connections before the disconnects")
    deadline = time.monotonic() + args.settle_limit
    while any(R.open_fds(p) > f + 2 for p, f in zip(pids, fds0, strict=True)):
        if time.monotonic() > deadline:
            PROBLEMS.append(f"{tag}: the nodes still hold connections after closing")
            break
        time.sleep(0.1)
    closed_wall = time.monotonic() - meter.t
    tail = wait_still(pids, redis, args.settle_limit, f"{tag} disconnect")
    row["disconnect"] = phase_figures(meter, idle, held, cpu, f"{tag} disconnect")
    row["disconnect"].update(closed_s=closed_wall, tail_s=tail, closed_by_server=dropped)
    mem2, data2 = redis.used_memory()
    row["used_memory_after"] = mem2
    row["used_memory_less_clients_after"] = data2
    left = int(redis("HLEN", hash_key))
    if left:
        PROBLEMS.append(f"{tag}: {left} members left in the presence hash after the disconnects")
    d = row["disconnect"]
    say(f"  disconnects: closed in {closed_wall:.1f}s (then {tail:.1f}s until still): pushd "
        f"{d['pushd_us_each']:.0f} us, Redis {d['redis_us_each']:.1f} us per disconnect; "
        f"used_memory {mem2 - mem0:+,} B against before; {left} members left")  # fmt: skip
    for p in nodes:
        p.alive()
    return row


_REDIS_PID = 0


def redis_pid() -> int:
    return _REDIS_PID


# ---------------------------------------------------------------- table


def med(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def table(results: dict[str, Any], configs: list[str]) -> str:
    rounds = results["rounds"]

    def each(config: str, *path: str) -> list[float]:
        out = []
        for r in rounds:
            v: Any = r.get(config)
            for p in path:
                v = v.get(p) if isinstance(v, dict) else None
            if v is not None:
                out.append(v)
        return out

    lines: list[tuple[str, ...]] = [("", *(LABELS[c] for c in configs))]

    def line(label: str, path: tuple[str, ...], spec: str, runs: bool = True) -> None:
        cells = []
        for c in configs:
            vals = each(c, *path)
            text = format(med(vals), spec) if vals else "-"
            if runs and len(vals) > 1:
                text += " (" + " ".join(format(v, spec) for v in vals) + ")"
            cells.append(text)
        lines.append((label, *cells))

    def diff(label: str, path: tuple[str, ...], spec: str) -> None:
        base = each("none", *path)
        cells = []
        for c in configs:
            vals = each(c, *path)
            if c == "none" or not vals or len(vals) != len(base):
                cells.append("")
                continue
            deltas = [v - b for v, b in zip(vals, base, strict=True)]
            # No ratio to a base of about nothing (Redis per disconnect without presence).
            ratio = ""
            if min(base) >= 0.5:
                ratio = f" (x{med([v / b for v, b in zip(vals, base, strict=True)]):.2f})"
            cells.append(f"{med(deltas):+{spec}}{ratio}")
        lines.append((label, *cells))

    line("connects/s (to ready)", ("connect", "connects_per_s"), ",.0f")
    line("pushd us per connect", ("connect", "pushd_us_each"), ",.0f")
    diff("  vs no presence (median of rounds)", ("connect", "pushd_us_each"), ",.0f")
    line("Redis us per connect", ("connect", "redis_us_each"), ".1f")
    diff("  vs no presence", ("connect", "redis_us_each"), ".1f")
    line("pushd us per disconnect", ("disconnect", "pushd_us_each"), ".0f")
    diff("  vs no presence", ("disconnect", "pushd_us_each"), ".0f")
    line("Redis us per disconnect", ("disconnect", "redis_us_each"), ".1f")
    diff("  vs no presence", ("disconnect", "redis_us_each"), ".1f")
    line("Redis used_memory per member, B", ("bytes_per_member",), ".0f")
    line("  less clients' buffers, B", ("data_bytes_per_member",), ".0f")
    line("  presence hash per member, B", ("hash_bytes_per_member",), ".0f")
    line("  presence hash, KiB", ("hash_bytes",), ",.0f", runs=False)
    line("  subscriber counts hash, B", ("counts_hash_bytes",), ".0f", runs=False)
    if any("query_default" in r.get("presence", {}) for r in rounds):
        for key, lim in (("query_default", "1000 (default)"), ("query_10000", "10000")):
            lines.append((f"GET presence, --max-presence-list {lim}:", *("" for _ in configs)))
            line("  latency p50 ms", (key, "p50_ms"), ".2f")
            line("  latency p99 ms", (key, "p99_ms"), ".2f")
            line("  Redis read script p50 us", (key, "redis_p50_us"), ",.0f")
            line("  Redis read script p99 us", (key, "redis_p99_us"), ",.0f")
            line("  answer KiB", (key, "body_bytes"), ",.0f", runs=False)
    for i, row in enumerate(lines[1:], 1):
        if "answer KiB" in row[0] or "hash, KiB" in row[0]:
            lines[i] = (row[0], *(_kib(c) for c in row[1:]))
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    text = [
        "  ".join(f"{cell:<{widths[0]}}" if j == 0 else f"{cell:>{widths[j]}}"
                  for j, cell in enumerate(r)).rstrip()
        for r in lines
    ]  # fmt: skip
    rule = "-" * max(len(t) for t in text)
    return "\n".join([rule, text[0], rule, *text[1:], rule])


def _kib(cell: str) -> str:
    try:
        return f"{float(cell.replace(',', '')) / 1024:,.0f}" if cell not in ("", "-") else cell
    except ValueError:
        return cell


# ---------------------------------------------------------------- main


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    global _REDIS_PID
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--members", type=int, default=10000, help="connections (members) [10000]")
    ap.add_argument("--nodes", type=int, default=2, help="pushd nodes per pair [2]")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; medians shown [3]")
    ap.add_argument("--queries", type=int, default=50, help="presence GETs per list size [50]")
    ap.add_argument("--join-leave", action="store_true", help="also a pair with --join-leave")
    ap.add_argument("--token", action="store_true",
                    help="clients with a token (sub, info); every node --token-secret")  # fmt: skip
    ap.add_argument("--connect-rate", type=float, default=3000.0,
                    help="connects/s of each node's wsclient [3000]")  # fmt: skip
    ap.add_argument("--idle-seconds", type=float, default=2.0,
                    help="idle CPU measured this long before each pair's connects [2]")  # fmt: skip
    ap.add_argument("--settle-limit", type=float, default=180.0,
                    help="seconds a phase may take to go still [180]")  # fmt: skip
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="seconds to wait in all for idle CPUs [60]")  # fmt: skip
    ap.add_argument("--pushd-src", type=Path, default=ROOT,
                    help="run pushd from this source tree (a git worktree)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="1,000 members, 1 round, 10 queries")
    args = ap.parse_args()
    if args.quick:
        args.members, args.rounds, args.queries = 1000, 1, 10
        args.quiet_wait = min(args.quiet_wait, 10.0)
    R.QUIET_WAIT = args.quiet_wait
    configs = ["none", "presence"] + (["join-leave"] if args.join_leave else [])
    if args.token:
        COMMON.extend(["--token-secret", SECRET])
    R.prepare_driver(("redis-server", "gcc", "taskset"))
    if (os.cpu_count() or 1) < 2:
        R.Child.pin = False
    else:
        os.sched_setaffinity(0, {int(R.CLIENT_CPU)})
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    R.OUT = OUT
    R.build_wsclient()
    command = "python bench/presence.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    results: dict[str, Any] = {
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "uptime_start": uptime(),
        "pushd_source": R.describe_source(args.pushd_src),
        "settings": {k: v for k, v in vars(args).items()},
        "configs": configs,
        "rounds": [],
    }
    say(f"presence costs: {command}; pushd {results['pushd_source']}; {results['uptime_start']}")
    code = 0
    nodes: dict[str, list[R.Pushd]] = {}
    try:
        redis_child = R.Child(
            "redis",
            ["redis-server", "--port", str(port := R.free_port()), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "notice"],
            R.SERVER_CPU,
        )  # fmt: skip
        redis_child.wait_for(r"Ready to accept connections", 20)
        redis_child.collect = False
        _REDIS_PID = redis_child.pid
        redis = Resp(port)
        for config in configs:
            nodes[config] = [
                R.Pushd(f"pushd-{config}-{i}", args.pushd_src, port, [*COMMON, *CONFIGS[config]])
                for i in range(args.nodes)
            ]
        query = R.Pushd(
            "pushd-query", args.pushd_src, port,
            [*COMMON, "--presence", PATTERN, "--max-presence-list", "10000"],
        )  # fmt: skip
        argv = {c: [str(a) for a in cast("list[Any]", nodes[c][0].child.proc.args)]
                for c in configs}  # fmt: skip
        argv["query"] = [str(a) for a in cast("list[Any]", query.child.proc.args)]
        results["pushd_argv"] = {
            c: " ".join(shlex.quote(a) for a in v[v.index("-n") - 1 :]) for c, v in argv.items()
        }
        who = ("with a token each (sub user-<node>, info {\"name\":..}; a personal "
               "channel too)") if args.token else "anonymous (user and info null)"  # fmt: skip
        results["shape"] = (
            f"{args.members:,} WebSockets on {CHANNEL}, {who}, {args.nodes} nodes x "
            f"{args.members // args.nodes:,} (one wsclient process per node, 500 per source "
            f"address), one redis-server; servers on CPU {R.SERVER_CPU}, load on CPU "
            f"{R.CLIENT_CPU}"
        )
        say(f"redis pid {_REDIS_PID} port {port}; " + "; ".join(
            f"{c}: pids {', '.join(str(p.pid) for p in nodes[c])}" for c in configs
        ) + f"; query node pid {query.pid}")  # fmt: skip
        for rnd in range(1, args.rounds + 1):
            order = configs if rnd % 2 else list(reversed(configs))
            say(f"--- round {rnd} of {args.rounds}: {', '.join(order)}")
            result: dict[str, Any] = {}
            for config in order:
                result[config] = run_pair(
                    config, nodes[config], redis, args.members, args, f"r{rnd}-{config}",
                    query if config == "presence" else None,
                )  # fmt: skip
            results["rounds"].append(result)
    except BenchError as e:
        PROBLEMS.append(f"error: {e}")
        say(f"error: {e}")
        code = 1
    except KeyboardInterrupt:
        PROBLEMS.append("interrupted")
        code = 1
    finally:
        R.Child.stop_all()
    results["uptime_end"] = uptime()
    results["total_s"] = time.monotonic() - R.T0
    results["problems"] = PROBLEMS
    results["other_load"] = R.OTHER_LOAD
    RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")
    buf = io.StringIO()
    with redirect_stdout(buf):
        report(results, configs)
    text = buf.getvalue()
    results["table"] = text
    RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")
    TEXT.write_text(text)
    print()
    print(text, end="")
    return 1 if code or PROBLEMS else 0


def report(results: dict[str, Any], configs: list[str]) -> None:
    n = len(results["rounds"])
    print(f"pushd presence costs ({n} round{'s' if n != 1 else ''}, median and each round's "
          f"figure in brackets; {results['total_s']:.0f}s; raw figures: "
          f"{RESULTS.relative_to(ROOT)}, this text: {TEXT.relative_to(ROOT)})")  # fmt: skip
    print(f"command: {results['command']}")
    print(f"pushd:   {results['pushd_source']}")
    if "shape" in results:
        print(f"shape:   {results['shape']}")
        for c, cmd in results.get("pushd_argv", {}).items():
            print(f"  {c:<10} {cmd} --redis ... (taskset -c {R.SERVER_CPU})")
    print(f"load:    start {results['uptime_start']}")
    print(f"         end   {results['uptime_end']}")
    if results["rounds"]:
        print(table(results, configs))
    notes = [
        "us per connect / disconnect: the CPU the phase took (until the servers were still "
        "again), less what the same processes use idle over as long, / connections; pushd "
        "is both nodes of the pair summed (/proc/PID/stat, 10 ms ticks), Redis from INFO cpu",
        "vs no presence: the difference to the pair without presence in the same round "
        "(median over rounds) and the ratio",
        "used_memory per member: INFO memory used_memory with every member in, less before "
        "the connects, / members; presence hash: MEMORY USAGE of pushd:{room:1}:presence "
        "(SAMPLES 0); less clients' buffers: used_memory - mem_clients_normal (Redis's "
        "query and reply buffers of pushd's connections); without presence the channel "
        "has only its subscriber counts hash",
        "GET presence: one keep-alive connection, one query after another, to a node "
        "holding half the members (--max-presence-list 1000) and to a node with "
        "--max-presence-list 10000 and no connection; Redis read script: its EVALSHA "
        "calls' own time in SLOWLOG (threshold 0 during the queries)",
    ]
    for o in results["other_load"]:
        notes.append(f"other processes used CPU {R.SERVER_CPU} during {o}: figures noisy")
    for note in notes:
        print(f"  {note}")
    if results["problems"]:
        print("problems:")
        for p in results["problems"]:
            print(f"  {p}")
    else:
        print("checks: every connection subscribed, every member in the presence hash and "
              "gone after the disconnects, every query counted every member")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
