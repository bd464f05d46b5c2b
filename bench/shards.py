#!/usr/bin/env python3
"""pushd with 1 vs 2 Redis shards, side by side, on loads spread over many channels.

    python bench/shards.py [--runs 3] [--quick] [--only fanout,post8,post50] [--workers 2]

Starts two redis-servers (shards A and B, `--save "" --appendonly no`), then for each
run and each shard count a fresh pushd (`--redis A`, or `--redis A --redis B`) and
measures, on channels sh0 .. sh1999 (jump hash puts about half of them on each shard):

  fanout  deliveries/s: subscribers spread over every channel (pushclient from
          /work/shared/bench-harness, one connection per channel and process), a burst
          of POSTs spread over every channel from 16 keep-alive connections;
  post8   POST/s: wrk -c8 with bench/post_many.lua (a random channel per request);
  post50  the same with -c50.

For every row: pushd's CPU and EACH redis-server's CPU (from /proc) per 1,000
messages, Redis's CPU per publish (and per delivery) on each shard, the publishes/s
one Redis core per shard would take at that cost, and what limited the row. Each
figure is the median run's. Logs go to bench/out/shards/, raw figures to
bench/out/shards.json. See bench/README.md ("1 vs 2 Redis shards").

Reuses bench/run.py's machinery (Child, Pushd, run_wrk, CpuMeter, wait_quiet, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # bench/compare.py (parse_rows)
import run as R  # bench/run.py

BENCH = R.BENCH
ROOT = R.ROOT
OUT = R.OUT / "shards"
RESULTS = R.OUT / "shards.json"
POST_MANY_LUA = BENCH / "post_many.lua"
HARNESS = Path(os.environ.get("BENCH_HARNESS", "/work/shared/bench-harness"))
PUSHCLIENT_SRC = HARNESS / "pushclient.c"
PUSHCLIENT = BENCH / "bin" / "pushclient"  # built from the harness's source

ROWS = ("fanout", "post8", "post50")
SHARD_NAMES = "AB"
PREFIX = "sh"  # the channels: sh0 .. sh<channels - 1>
PER_PROCESS = 1000  # subscribers per pushclient process (one source address)
say = R.say
BenchError = R.BenchError
PROBLEMS: list[str] = []
PUSHD_SRC = ROOT
DASH = "\u2013"

sys.path.insert(0, str(ROOT))
from pushd.broker.redis.sharding import shard_of  # noqa: E402  (the definition pushd uses)

# ---------------------------------------------------------------- servers


class Redis:
    """One redis-server: a shard."""

    def __init__(self, name: str, cpu: str) -> None:
        self.name = name
        self.port = R.free_port()
        self.child = R.Child(
            f"redis-{name}",
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--loglevel", "notice"],
            cpu,
        )  # fmt: skip
        self.child.wait_for(r"Ready to accept connections", 20)
        self.child.collect = False
        self.pid = self.child.pid

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=60
        )
        if out.returncode != 0 or out.stdout.startswith("ERR"):
            raise BenchError(f"redis-cli -p {self.port} {' '.join(args)[:60]}: {out.stdout}")
        return out.stdout


def evalsha_calls(shards: list[Redis]) -> list[int]:
    """Each shard's count of EVALSHA calls (INFO commandstats): pushd runs its
    publish script with EVALSHA, once a message."""
    calls = []
    for r in shards:
        m = re.search(r"^cmdstat_evalsha:calls=(\d+)", r.cli("INFO", "commandstats"), re.M)
        calls.append(int(m.group(1)) if m else 0)
    return calls


class Rig:
    """The two shards; quacks like run.py's Servers where run_wrk needs it (`redis`,
    `alive()`): `redis` is shard A, whose CPU run_wrk's CpuMeter counts as Redis's."""

    def __init__(self, cpu: str) -> None:
        self.shards = [Redis(name, cpu) for name in SHARD_NAMES]
        self.redis = self.shards[0].child

    def alive(self) -> None:
        for r in self.shards:
            if r.child.proc.poll() is not None:
                raise BenchError(f"{r.child.name} died; see {r.child.log_path}")


class ShardedPushd(R.Pushd):
    """pushd on the first `n` shards: `--redis A [--redis B]`. Ready once GET /health
    says every shard is up (it answers 200 "degraded" while one is not yet)."""

    def __init__(self, name: str, shards: list[Redis], workers: int, cpu: str) -> None:
        self.n_shards = len(shards)
        options = []
        for r in shards[1:]:
            options += ["--redis", f"redis://127.0.0.1:{r.port}"]
        super().__init__(name, PUSHD_SRC, shards[0].port, options, cpu=cpu, workers=workers)

    def wait_healthy(self, name: str, need: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        ok = 0
        while ok < need:
            if time.monotonic() > deadline:
                raise BenchError(f"{name}: /health does not say every shard is up")
            try:
                health = R.get_json(self.port, "/health")
            except (BenchError, OSError, TimeoutError):
                health = {}
            shards = health.get("shards", [])
            if len(shards) == self.n_shards and all(s["up"] for s in shards):
                ok += 1
            else:
                ok = 0
                time.sleep(0.02)
        super().wait_healthy(name, need, timeout)


class Target:
    """What run_wrk and CpuMeter are given: pushd, with the shards other than A
    counted among the "server" processes, so that CpuMeter's "other processes"
    are really others (every shard shares the servers' CPU)."""

    def __init__(self, pushd: ShardedPushd, extra_pids: list[int]) -> None:
        self.pushd = pushd
        self.port = pushd.port
        self.server_pids = [*pushd.server_pids, *extra_pids]

    def alive(self) -> None:
        self.pushd.alive()


class Meter:
    """CPU seconds of each pushd process and each shard's redis-server over a phase."""

    def __init__(self, pushd: list[int], redis: list[int]) -> None:
        self.pids = [*pushd, *redis]
        self.n = len(pushd)
        self.t = time.monotonic()
        self.cpu = [R.cpu_seconds(p) for p in self.pids]

    def stop(self) -> tuple[list[float], list[float], float]:
        used = [R.cpu_seconds(p) - c for p, c in zip(self.pids, self.cpu, strict=True)]
        return used[: self.n], used[self.n :], time.monotonic() - self.t


def build_pushclient() -> None:
    if PUSHCLIENT.exists() and PUSHCLIENT.stat().st_mtime >= PUSHCLIENT_SRC.stat().st_mtime:
        return
    if not PUSHCLIENT_SRC.exists():
        raise BenchError(f"no {PUSHCLIENT_SRC} (set BENCH_HARNESS to the harness's directory)")
    PUSHCLIENT.parent.mkdir(exist_ok=True)
    cmd = ["gcc", "-O2", "-o", str(PUSHCLIENT), str(PUSHCLIENT_SRC)]
    say("compiling: " + " ".join(cmd))
    subprocess.run(cmd, check=True)


# ---------------------------------------------------------------- figures


def cpu_figures(
    row: dict[str, Any], pushd_s: list[float], redis_s: list[float], wall: float
) -> None:
    """CPU per 1,000 messages and per publish of each process, Redis's ceiling."""
    msgs = row["messages"]
    per_shard = row["messages_per_shard"]
    row["pushd_cpu_s"] = pushd_s
    row["redis_cpu_s"] = redis_s
    row["wall_s"] = wall
    row["pushd_cpu_percent"] = [100 * c / wall for c in pushd_s]
    row["redis_cpu_percent"] = [100 * c / wall for c in redis_s]
    row["pushd_s_per_1k"] = 1000 * sum(pushd_s) / msgs if msgs else 0.0
    row["redis_s_per_1k"] = [1000 * c / msgs if msgs else 0.0 for c in redis_s]
    us = [1e6 * c / m if m else 0.0 for c, m in zip(redis_s, per_shard, strict=True)]
    row["redis_us_per_publish"] = us
    if row.get("deliveries"):
        per = row["deliveries_per_shard"]
        row["redis_us_per_delivery"] = [
            1e6 * c / d if d else 0.0 for c, d in zip(redis_s, per, strict=True)
        ]
    # One core per shard: the publishes/s at which the busiest shard would be 100 %
    # busy, at this cost per publish (each command arriving on its own; pipelined,
    # Redis does more per core).
    shares = [m / msgs if msgs else 0.0 for m in per_shard]
    row["redis_ceiling_per_shard"] = [1e6 / u if u else 0.0 for u in us]
    row["redis_ceiling"] = min(
        (1e6 / (u * share) for u, share in zip(us, shares, strict=True) if u and share),
        default=0.0,
    )


def limited_by(row: dict[str, Any], pinned: bool) -> str:
    pushd = row["pushd_cpu_percent"]
    redis = row["redis_cpu_percent"]
    load = row["load_cpu_percent"]
    other = row.get("other_cpu_percent", 0.0)
    each_pushd = " + ".join(f"{p:.0f}%" for p in pushd)
    each_redis = " + ".join(f"{r:.0f}%" for r in redis)
    if pinned:
        cpu0 = sum(pushd) + sum(redis)
        if max(pushd) >= 85:
            return f"pushd ({each_pushd} of its core; Redis {each_redis})"
        if cpu0 >= 90:
            return f"CPU {R.SERVER_CPU}: pushd {each_pushd} + Redis {each_redis}"
        if cpu0 + other >= 90:
            return (
                f"CPU {R.SERVER_CPU}, shared: pushd {each_pushd} + Redis {each_redis} + "
                f"other processes {other:.0f}%"
            )
        if load >= 85:
            return f"the load on CPU {R.CLIENT_CPU} ({load:.0f}%)"
        return (
            f"nothing saturated (CPU {R.SERVER_CPU} {cpu0:.0f}%, load {load:.0f}%): "
            "round trips of the load's connections"
        )
    total = sum(pushd) + sum(redis) + load
    if max(pushd) >= 90:
        return f"pushd (workers {each_pushd}; Redis {each_redis}, load {load:.0f}%)"
    if total + other >= 170:
        if other >= 10:
            each_redis += f" + other processes {other:.0f}%"
        return f"both CPUs: pushd {each_pushd} + Redis {each_redis} + load {load:.0f}% (of 200%)"
    return f"nothing saturated: pushd {each_pushd}, Redis {each_redis}, load {load:.0f}%"


def shard_split(n: int, channels: int) -> list[int]:
    """How many of the channels each of the n shards holds."""
    counts = Counter(shard_of(f"{PREFIX}{i}", n) for i in range(channels))
    return [counts[s] for s in range(n)]


# ---------------------------------------------------------------- fan-out


def marker_body(seq: int) -> bytes:
    """A JSON string of 100 bytes with pushclient's marker "#S<seq>T<unix us>#"."""
    text = f"#S{seq}T{time.time_ns() // 1000}#"
    return json.dumps(text + "x" * max(0, 98 - len(text))).encode()


async def _spread_burst(port: int, channels: int, per_channel: int, nconn: int) -> Counter[int]:
    """per_channel rounds over every channel (round k: message k of each channel),
    from nconn keep-alive connections, each POSTing as soon as its last was answered."""
    statuses: Counter[int] = Counter()
    todo = ((k, c) for k in range(per_channel) for c in range(channels))
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(nconn)]

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for k, c in todo:
            status, _ = await R._request(
                reader, writer, port, f"/channels/{PREFIX}{c}", marker_body(k)
            )
            statuses[status] += 1

    await asyncio.gather(*(worker(r, w) for r, w in conns))
    for _, w in conns:
        w.close()
    return statuses


def wait_redis_subscribed(shards: list[Redis], channels: int, timeout: float = 60) -> None:
    """Until every channel is subscribed at its shard (pushd subscribes a channel on
    its shard when its first WebSocket subscribes) and, with several workers (each
    subscribes the channels of its own connections), the count held still for 0.5 s."""
    n = len(shards)
    names: list[list[str]] = [[] for _ in shards]
    for i in range(channels):
        names[shard_of(f"{PREFIX}{i}", n)].append(f"pushd:{PREFIX}{i}")
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while True:
        short = total = 0
        for r, chans in zip(shards, names, strict=True):
            counts = [int(x) for x in r.cli("PUBSUB", "NUMSUB", *chans).split()[1::2]]
            short += sum(1 for x in counts if x < 1)
            total += sum(counts)
        if total != last:
            last, since = total, time.monotonic()
        if not short and time.monotonic() - since >= 0.5:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{short} channels still not subscribed at Redis after {timeout}s")
        time.sleep(0.1)


def hist_pct(hists: list[list[list[int]]], q: float) -> float:
    merged: Counter[int] = Counter()
    for h in hists:
        for us, n in h:
            merged[us] += n
    total = sum(merged.values())
    seen = 0
    for us in sorted(merged):
        seen += merged[us]
        if seen >= q * total:
            return us / 1000
    return 0.0


def row_fanout(
    rig: Rig, p: ShardedPushd, n: int, channels: int, subs: int, per_channel: int, tag: str
) -> dict[str, Any]:
    """`subs` pushclient processes, each subscribing every channel once; per_channel
    messages to each channel."""
    cpu = LOAD_CPU
    # pushd admits 1,000 connections per client address (--max-connections-per-ip):
    # each process takes at most PER_PROCESS channels, from a source address of its own.
    clients = []
    for k in range(subs):
        for j, first in enumerate(range(0, channels, PER_PROCESS)):
            argv = [
                str(PUSHCLIENT), "--mode", "sub",
                "--url", f"ws://127.0.0.1:{p.port}/ws?channel={PREFIX}{{i}}",
                "--n", str(min(PER_PROCESS, channels - first)), "--idx-off", str(first),
                "--src", R.SOURCES.take(1), "--rate", "2000", "--inflight", "64",
                "--expect", str(per_channel), "--duration", "900",
            ]  # fmt: skip
            clients.append(R.Child(f"pushclient-{tag}-{k}-{j}", argv, cpu))
    held = 0
    for c in clients:
        m = c.wait_for(r"all resolved: connected=(\d+) failed=(\d+)", 60 + channels * subs / 200)
        held += int(m.group(1))
        if int(m.group(2)):
            raise BenchError(f"{c.name}: {m.group(2)} connections failed; see {c.log_path}")
    wait_redis_subscribed(rig.shards[:n], channels)
    msgs = channels * per_channel
    R.wait_quiet()
    others = [r.pid for r in rig.shards[1:n]]
    warn = R.CpuMeter([*p.server_pids, *others], rig.shards[0].pid, pinned=PINNED)
    calls0 = evalsha_calls(rig.shards[:n])
    meter = Meter(p.server_pids, [r.pid for r in rig.shards[:n]])
    own = R.own_cpu_seconds()
    start_us = time.time_ns() // 1000
    statuses = asyncio.run(
        asyncio.wait_for(_spread_burst(p.port, channels, per_channel, R.PUBLISHERS), 600)
    )
    publish_s = time.time_ns() // 1000 - start_us
    reps = [c.json(120 + msgs * subs / 5000) for c in clients]
    publisher_s = R.own_cpu_seconds() - own
    client_s = sum(r["cpu_user_s"] + r["cpu_sys_s"] for r in reps)
    other = warn.percent(f"{tag} fan-out", clients_s=client_s)[2]
    pushd_s, redis_s, _ = meter.stop()
    calls = [b - a for a, b in zip(calls0, evalsha_calls(rig.shards[:n]), strict=True)]
    for c in clients:
        c.stop()
    rig.alive()
    p.alive()
    # The subscribed frames have no marker: counted by pushclient as unparsed.
    deliveries = sum(r["msgs"] - r["unparsed"] for r in reps)
    last = max((r["last_rx_us"] for r in reps if r["msgs"]), default=start_us)
    span = (last - start_us) / 1e6
    split = shard_split(n, channels)
    row: dict[str, Any] = {
        "channels": channels,
        "subscribers": held,
        "subscribers_per_channel": subs,
        "messages": msgs,
        "messages_per_shard": [c * per_channel for c in split],
        "deliveries_per_shard": [c * per_channel * subs for c in split],
        "post_status": dict(statuses),
        "deliveries": deliveries,
        "expected": msgs * subs,
        "missing": msgs * subs - deliveries,
        "duplicates": sum(r["dup"] for r in reps),
        "out_of_order": sum(r["ooo"] for r in reps),
        "span_s": span,
        "rate": deliveries / span if span > 0 else 0.0,
        "publishes_per_s": msgs / (publish_s / 1e6) if publish_s else 0.0,
        "p50_ms": hist_pct([r["hist"] for r in reps], 0.5),
        "p99_ms": hist_pct([r["hist"] for r in reps], 0.99),
        "load_cpu_percent": 100 * (client_s + publisher_s) / span if span > 0 else 0.0,
        "other_cpu_percent": other,
        "evalsha_per_shard": calls,
    }
    # CPU over the phase: the servers are idle before the first POST and after the
    # last delivery, so the meter's longer wall time only matters for the percentages.
    cpu_figures(row, pushd_s, redis_s, span)
    row["limited_by"] = limited_by(row, PINNED)
    if not msgs <= sum(calls) <= msgs * 1.01 + 50:
        PROBLEMS.append(f"{tag} fan-out: {msgs} messages POSTed, {sum(calls)} EVALSHA")
    bad = {k: v for k, v in statuses.items() if not 200 <= k < 300}
    if bad or row["missing"] or row["duplicates"] or held != channels * subs:
        PROBLEMS.append(
            f"{tag} fan-out: POST statuses {dict(statuses)}, {held:,} of {channels * subs:,} "
            f"subscribed, {row['missing']:,} deliveries missing, {row['duplicates']} duplicated"
        )
    say(
        f"{tag} fan-out: {msgs:,} messages over {channels:,} channels ({held:,} subscribers): "
        f"{deliveries:,} deliveries in {span:.2f}s = {row['rate']:,.0f}/s "
        f"({row['publishes_per_s']:,.0f} POST/s), p50 {row['p50_ms']:.1f} ms; " + cpu_line(row)
    )
    return row


def cpu_line(row: dict[str, Any]) -> str:
    redis = ", ".join(
        f"{SHARD_NAMES[i]} {pct:.0f}% ({us:.1f} us/publish)"
        for i, (pct, us) in enumerate(
            zip(row["redis_cpu_percent"], row["redis_us_per_publish"], strict=True)
        )
    )
    pushd = " + ".join(f"{c:.0f}%" for c in row["pushd_cpu_percent"])
    return f"CPU: pushd {pushd}, Redis {redis}, load {row['load_cpu_percent']:.0f}%"


# ---------------------------------------------------------------- POST/s


def row_post(
    rig: Rig, p: ShardedPushd, n: int, channels: int, conns: int, seconds: int, tag: str
) -> dict[str, Any]:
    others = [r.pid for r in rig.shards[1:n]]
    target = Target(p, others)
    R.wait_quiet()
    calls0 = evalsha_calls(rig.shards[:n])
    meter = Meter(p.server_pids, [r.pid for r in rig.shards[:n]])
    res = R.run_wrk(
        rig, target, "/", f"{tag} POST -c{conns}",  # type: ignore[arg-type]
        seconds=seconds, threads=2 if conns >= 16 else 1, conns=conns,
        script=POST_MANY_LUA, script_args=(str(channels), PREFIX),
        log_name=f"wrk-{tag}-c{conns}", echo=False, cpu=LOAD_CPU,
    )  # fmt: skip
    pushd_s, redis_s, _ = meter.stop()
    calls = [b - a for a, b in zip(calls0, evalsha_calls(rig.shards[:n]), strict=True)]
    res.pop("wrk_output")
    msgs = res["responses_lua"] - res["non_2xx_lua"]
    wall = res["requests"] / res["requests_per_s"] if res["requests_per_s"] else 1.0
    split = shard_split(n, channels)
    row: dict[str, Any] = {
        "wrk": res,
        "connections": conns,
        "rate": res["requests_per_s"],
        "messages": msgs,
        # wrk picks channels at random: each shard's publish scripts, counted by
        # Redis (wrk's last requests may be answered after it stopped counting).
        "messages_per_shard": calls,
        "channels_per_shard": split,
        "p50_ms": res["p50_ms"],
        "p99_ms": res["p99_ms"],
        "load_cpu_percent": res["client_cpu_percent"],
        "other_cpu_percent": res.get("other_cpu0_percent", res.get("other_cpu_percent", 0.0)),
    }
    cpu_figures(row, pushd_s, redis_s, wall)
    row["limited_by"] = limited_by(row, PINNED)
    # pushd's own scripts (subscriber counts, the shard map) add a few calls.
    if not msgs <= sum(calls) <= msgs * 1.01 + conns + 50:
        PROBLEMS.append(f"{tag} POST -c{conns}: {msgs} POSTs answered 2xx, {sum(calls)} EVALSHA")
    if res["non_2xx_lua"] or res["socket_errors"]:
        PROBLEMS.append(
            f"{tag} POST -c{conns}: {res['non_2xx_lua']} non-2xx, "
            f"{res['socket_errors']} socket errors"
        )
    say(
        f"{tag} POST -c{conns}: {row['rate']:,.0f}/s, p50 {row['p50_ms']:.2f} ms p99 "
        f"{row['p99_ms']:.2f} ms; " + cpu_line(row)
    )
    return row


# ---------------------------------------------------------------- one run


def one_run(rig: Rig, n: int, run: int, rows: set[str], args: argparse.Namespace) -> dict[str, Any]:
    tag = f"{n}shard{'s' if n > 1 else ''}-run{run}"
    p = ShardedPushd(f"pushd-{tag}", rig.shards[:n], args.workers, SERVER_CPUS)
    try:
        say(
            f"{tag}: pushd pid {p.pid} on port {p.port}, --redis "
            + " --redis ".join(f"{SHARD_NAMES[i]}:{r.port}" for i, r in enumerate(rig.shards[:n]))
        )
        out: dict[str, Any] = {}
        if "fanout" in rows:
            out["fanout"] = row_fanout(
                rig, p, n, args.channels, args.subscribers, args.messages, tag
            )
        for conns in (8, 50):
            if f"post{conns}" in rows:
                out[f"post{conns}"] = row_post(
                    rig, p, n, args.channels, conns, args.wrk_seconds, tag
                )
        return out
    finally:
        p.stop()
        for r in rig.shards:
            try:
                r.cli("FLUSHALL")
            except (BenchError, OSError, subprocess.TimeoutExpired) as e:
                say(f"  FLUSHALL on {r.name}: {e}")


# ---------------------------------------------------------------- table


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose rate is the median (lower middle): its CPU figures go with it."""
    return sorted(runs, key=lambda r: r["rate"])[(len(runs) - 1) // 2]


def fmt_list(values: list[float], spec: str) -> str:
    return " / ".join(format(v, spec) for v in values)


def table(results: dict[str, Any], rows: list[str]) -> tuple[str, list[str]]:
    head = ("", "1 shard (A)", "2 shards (A / B)")
    lines: list[tuple[str, ...]] = [head]
    notes = []
    titles = {
        "fanout": "fan-out: deliveries/s",
        "post8": "POST/s, wrk -c8",
        "post50": "POST/s, wrk -c50",
    }
    for name in rows:
        per_n = {n: [r[name] for r in results["runs"][str(n)] if name in r] for n in (1, 2)}
        if not all(per_n.values()):
            continue
        med = {n: median_run(per_n[n]) for n in (1, 2)}
        title = titles[name]
        if name == "fanout":
            f = med[1]
            title = (
                f"fan-out {f['channels']:,} ch x {f['subscribers_per_channel']} subs: deliveries/s"
            )

        def line(label: str, key: str, spec: str, med: dict[int, Any] = med) -> None:
            cells = []
            for n in (1, 2):
                v = med[n].get(key)
                if v is None:
                    cells.append(DASH)
                elif isinstance(v, list):
                    cells.append(fmt_list(v, spec))
                else:
                    cells.append(format(v, spec))
            lines.append((label, *cells))

        runs_txt = [" ".join(f"{r['rate']:,.0f}" for r in per_n[n]) for n in (1, 2)]
        lines.append((title, *(f"{med[n]['rate']:,.0f}" for n in (1, 2))))
        if len(per_n[1]) > 1:
            lines.append(("  runs", *runs_txt))
        if name == "fanout":
            line("  publishes/s", "publishes_per_s", ",.0f")
        lines.append(
            (
                "  latency p50 / p99 ms",
                *(f"{med[n]['p50_ms']:.1f} / {med[n]['p99_ms']:.1f}" for n in (1, 2)),
            )
        )
        line("  pushd CPU s per 1k msgs", "pushd_s_per_1k", ".3f")
        line("  Redis CPU s per 1k msgs", "redis_s_per_1k", ".3f")
        line("  Redis us per publish", "redis_us_per_publish", ".1f")
        if name == "fanout":
            line("  Redis us per delivery", "redis_us_per_delivery", ".2f")
        line("  CPU %: pushd", "pushd_cpu_percent", ".0f")
        line("  CPU %: Redis", "redis_cpu_percent", ".0f")
        line("  CPU %: load", "load_cpu_percent", ".0f")
        line("  Redis core/shard: publishes/s", "redis_ceiling_per_shard", ",.0f")
        line("  Redis ceiling, all shards", "redis_ceiling", ",.0f")
        for n in (1, 2):
            notes.append(f"{title.split(':')[0]}, {n} shard{'s' if n > 1 else ''}: "
                         f"limited by {med[n]['limited_by']}")  # fmt: skip
    widths = [max(len(row[i]) for row in lines) for i in range(3)]
    text = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in lines]
    rule = "-" * max(len(t) for t in text)
    return "\n".join([rule, text[0], rule, *text[1:], rule]), notes


# ---------------------------------------------------------------- main

SERVER_CPUS = R.SERVER_CPU
LOAD_CPU = R.CLIENT_CPU
PINNED = True


def main() -> int:
    global PUSHD_SRC, SERVER_CPUS, LOAD_CPU, PINNED
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, help="runs of every row; medians are shown [3; quick 1]")
    ap.add_argument("--quick", action="store_true", help="small counts: a smoke test (~15-30 s)")
    ap.add_argument("--only", default="", help=f"rows: {','.join(ROWS)} (or 1-3)")
    ap.add_argument("--channels", type=int, default=2000, help="channels [2000]")
    ap.add_argument("--subscribers", type=int, help="fan-out: subscribers per channel [5; quick 1]")
    ap.add_argument("--messages", type=int, help="fan-out: messages per channel [5; quick 2]")
    ap.add_argument("--wrk-seconds", type=int, help="each wrk run [5; quick 2]")
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="pushd --workers N [1]; above 1 nothing is pinned (servers and load share the CPUs)",
    )
    ap.add_argument(
        "--quiet-wait", type=float, help="seconds to wait in all for idle CPUs [60; quick 0]"
    )
    ap.add_argument("--pushd-src", type=Path, default=ROOT, help="pushd from this source tree")
    args = ap.parse_args()
    PUSHD_SRC = args.pushd_src
    quick = args.quick
    n_runs = args.runs or (1 if quick else 3)
    rows = compare.parse_rows(args.only, ap, ROWS) or set(ROWS)
    args.subscribers = args.subscribers or (1 if quick else 5)
    args.messages = args.messages or (2 if quick else 5)
    args.wrk_seconds = args.wrk_seconds or (2 if quick else 5)
    R.QUIET_WAIT = args.quiet_wait if args.quiet_wait is not None else (0.0 if quick else 60.0)
    R.PUBLISHERS = 16
    R.prepare_driver(("redis-server", "redis-cli", "wrk", "gcc", "taskset"))
    if (os.cpu_count() or 1) < 2:
        R.Child.pin = False
        PINNED = False
    elif args.workers > 1:
        # A worker needs a core of its own: servers and load share both CPUs.
        SERVER_CPUS = LOAD_CPU = R.ALL_CPUS
        PINNED = False
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    else:
        os.sched_setaffinity(0, {int(R.CLIENT_CPU)})  # the publisher runs here
    shutil.rmtree(OUT, ignore_errors=True)
    RESULTS.unlink(missing_ok=True)
    OUT.mkdir(parents=True)
    R.OUT = OUT  # run.py's children log to bench/out/shards/
    build_pushclient()
    split = shard_split(2, args.channels)
    layout = (
        f"pushd + both redis-servers on CPU {R.SERVER_CPU}, load on CPU {R.CLIENT_CPU}"
        if PINNED
        else "nothing pinned"
    )
    results: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "runs_wanted": n_runs,
        "rows": sorted(rows, key=ROWS.index),
        "workers": args.workers,
        "layout": layout,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "pushd_source": R.describe_source(PUSHD_SRC),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[0],
        "settings": {
            "channels": args.channels, "channels_per_shard_of_2": split,
            "subscribers_per_channel": args.subscribers, "messages_per_channel": args.messages,
            "wrk_seconds": args.wrk_seconds, "publishers": R.PUBLISHERS,
        },
        "runs": {"1": [], "2": []},
    }  # fmt: skip
    say(
        f"shards ({results['mode']}, {n_runs} run{'s' if n_runs > 1 else ''}; rows "
        f"{','.join(results['rows'])}; pushd --workers {args.workers}): {layout}; "
        f"{args.channels:,} channels, {split[0]:,} on A and {split[1]:,} on B with 2 shards; "
        f"pushd {results['pushd_source']}; load average {results['loadavg_start']}; "
        f"logs in {OUT.relative_to(ROOT)}/"
    )
    code = 0
    try:
        rig = Rig(SERVER_CPUS)
        say(", ".join(f"redis {r.name} pid {r.pid} port {r.port}" for r in rig.shards))
        for run in range(1, n_runs + 1):
            say(f"--- run {run} of {n_runs}")
            # Who goes first alternates, so a drift of the machine hits both alike.
            for n in (1, 2) if run % 2 else (2, 1):
                results["runs"][str(n)].append(one_run(rig, n, run, rows, args))
    except BenchError as e:
        PROBLEMS.append(f"error: {e}")
        say(f"error: {e}")
        code = 1
    except KeyboardInterrupt:
        PROBLEMS.append("interrupted")
        code = 1
    finally:
        R.Child.stop_all()
    results["total_s"] = time.monotonic() - R.T0
    text, notes = table(results, results["rows"]) if not code else ("", [])
    results["table"] = text
    results["notes"] = notes
    results["problems"] = PROBLEMS
    results["other_load"] = R.OTHER_LOAD
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(
        f"pushd with 1 vs 2 Redis shards ({results['mode']}, median of {n_runs} "
        f"run{'s' if n_runs > 1 else ''}, {results['total_s']:.0f}s; pushd --workers "
        f"{args.workers}, {layout}; raw figures: {RESULTS.relative_to(ROOT)})"
    )
    if text:
        print(text)
    others = R.OTHER_LOAD
    for note in [
        *notes,
        "CPU s per 1k msgs = CPU seconds per 1,000 messages (= ms per message); Redis "
        "columns are per shard (A / B)",
        "Redis us per publish: each shard's CPU / the publishes on its channels (wrk rows: "
        "its EVALSHA calls, counted by Redis); publishes/s = 1e6 / that: what one "
        "core per shard would take at this cost (commands arrive one by one here; "
        "pipelined, Redis does more); all shards: where the busiest shard is full",
        *(f"other processes used the CPUs during {o}: those figures are low" for o in others),
    ]:
        print(f"  {note}")
    if PROBLEMS:
        print("problems:")
        for p in PROBLEMS:
            print(f"  {p}")
        return 1
    print("checks: every subscriber connected, no delivery missing or duplicated, every POST 2xx")
    return code


if __name__ == "__main__":
    sys.exit(main())
