#!/usr/bin/env python3
"""pushd next to Nchan (and the nginx+Lua gateway for the POST rows) under the
shared harness's scenarios (../shared/bench-harness/: pushclient, bench.py
fanout/conns/ingest, pub.py), side by side in one run; issue 20's targets.

    python bench/harness.py [--runs N] [--only 1,2,...] [--quick] [--pushd-src DIR]

Rows (the issue's targets; ratio = how many times better pushd is):
  1 fan-out deliveries/s, 10,000 subscribers x 100 messages, ONE publisher
    connection (HTTP keep-alive, one request in flight: bench.py fanout --rate 0)
  2 p99 latency, 10,000 subscribers x 5 msg/s (20 messages), same subscribers' URL
  3 POST/s, wrk -c50 and -c8 (bench.py ingest, 100-byte text/plain body): pushd
    /channels/{c} and /push?c= against the gateway's /push, on a fresh pushd and
    on the pushd that just served rows 1-2; CPU us per request of the server and Redis
  4 batch msgs/s, POST /publish, 400 NDJSON lines (bench/batch.lua), wrk -c8 (pushd only)
  5 idle KiB per connection at 15,000 (bench.py conns), WebSocket and SSE, pushd and
    Nchan, a fresh server for each
  6 pushd --workers 2 against Nchan worker_processes 2, fan-out 10,000 x 100 with one
    publisher, nothing pinned (both cores, Redis too)
  7 reconnect storm (pushd only): nodes A and B on one Redis; 15,000 fresh WebSocket
    connects to A at once (timed to the last subscribed frame); A SIGKILLed, 100 messages
    published through B, A restarted on its port; 15,000 clients resume at once with
    `since` = the last id they saw (wsclient --catchup 100): the time from their start to
    the last one's 100th message, against the fresh connects' (target <= 2x); every
    client recovered:true, every message exactly once

Servers (redis-server, pushd, nginx) on CPU 0, clients (pushclient, pub.py, wrk)
on CPU 1, except row 6; row 7's clients are bench/bin/wsclient (bench/wsclient.c).
Each figure is the median of --runs runs. Reuses bench/compare.py's and
bench/run.py's machinery to start the servers. The
harness is used from where it is: bench/bin/harness/ holds symlinks to its
bench.py, pub.py and post.lua (bench.py finds pushclient next to itself) and
pushclient built from its pushclient.c. Logs go to bench/out/harness/, the raw
figures to bench/out/harness.json. See bench/README.md ("The shared harness").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare as C
import run as R

BENCH = R.BENCH
ROOT = R.ROOT
HARNESS = Path(os.environ.get("BENCH_HARNESS", ROOT.parent / "shared" / "bench-harness"))
LINKS = BENCH / "bin" / "harness"  # symlinks to the harness's scripts, pushclient built here
OUT = R.OUT / "harness"
RESULTS = R.OUT / "harness.json"
ROWS = ("fanout", "latency", "post", "batch", "idle", "workers", "storm")  # --only, also 1..7
PROBLEMS: list[str] = []
COMMANDS: list[str] = []
PUSHD_SRC = ROOT
# pushd admits 1,000 connections per client address by default; the harness opens
# all of a process's connections from one address (127.0.0.2, ...).
PUSHD_OPTIONS = ["--max-connections-per-ip", "20000"]
say = R.say


# ---------------------------------------------------------------- the harness


def setup_harness() -> None:
    if not (HARNESS / "bench.py").exists():
        raise R.BenchError(f"no shared harness in {HARNESS} (set BENCH_HARNESS)")
    LINKS.mkdir(parents=True, exist_ok=True)
    for name in ("bench.py", "pub.py", "post.lua"):
        link = LINKS / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(HARNESS / name)
    client, src = LINKS / "pushclient", HARNESS / "pushclient.c"
    if not client.exists() or client.stat().st_mtime < src.stat().st_mtime:
        cmd = ["gcc", "-O2", "-o", str(client), str(src)]
        say("compiling: " + " ".join(cmd))
        subprocess.run(cmd, check=True)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return " ".join(a.decode() for a in f.read().split(b"\0") if a)


def note_command(cmd: str) -> None:
    COMMANDS.append(cmd)
    say("  $ " + cmd)


def bench_py(tool: str, args: list[str], label: str, timeout: float = 600) -> dict[str, Any]:
    """`python3 bench.py TOOL ARGS --out FILE` (the harness's driver, run on the
    clients' CPU); its full JSON result, with the load average before it."""
    R.wait_quiet()
    out = OUT / f"{label}.json"
    out.unlink(missing_ok=True)
    cpu = R.CLIENT_CPU if tool != "fanout" or "--cpu" not in args else args[args.index("--cpu") + 1]
    cmd = ["taskset", "-c", cpu, "python3", str(LINKS / "bench.py"), tool, *args, "--out", str(out)]
    up = uptime()
    say(f"{label}: {up}")
    note_command(" ".join(cmd).replace(str(LINKS), "bench/bin/harness"))
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    (OUT / f"{label}.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0 or not out.exists():
        raise R.BenchError(
            f"{label}: bench.py exited {p.returncode}:\n{p.stdout[-800:]}{p.stderr[-800:]}"
        )
    res = json.loads(out.read_text())
    res["uptime"] = up
    res["wall_s"] = time.monotonic() - t0
    return res


# ---------------------------------------------------------------- the servers


class NginxN(C.Nginx):
    """compare.py's Nginx with a template from anywhere (a variant written to
    bench/out/harness/), N workers and a CPU list."""

    def __init__(
        self,
        name: str,
        conf_text: str,
        workers: int = 1,
        cpu: str = R.SERVER_CPU,
        redis_port: int = 0,
    ) -> None:
        template = OUT / f"{name}.template"
        template.write_text(
            conf_text.replace("worker_processes 1;", f"worker_processes {workers};")
        )
        saved, R.SERVER_CPU = R.SERVER_CPU, cpu
        try:
            self._workers = workers
            super().__init__(name, str(template), redis_port)
        except R.BenchError as e:
            if f"{workers} worker processes, not 1" not in str(e):
                raise
            self.server_pids = R.children_of(self.pid)
            self.worker = self.server_pids[0]
        finally:
            R.SERVER_CPU = saved
        say(f"  {name}: {cmdline(self.pid)} (workers {self.server_pids}) on CPU {cpu}")


def nchan_conf(sse: bool = False) -> str:
    text = (C.PEERS / "nchan.conf").read_text()
    if sse:  # the same location, also an EventSource subscriber (Accept: text/event-stream)
        text = text.replace(
            "nchan_subscriber websocket;", "nchan_subscriber websocket eventsource;"
        )
    return text


def start_pushd(
    rig: R.Servers,
    name: str,
    workers: int = 1,
    cpu: str = R.SERVER_CPU,
    options: tuple[str, ...] = (),
    **listen: Any,
) -> R.Pushd:
    """`listen`: R.Pushd's backlog, port, backlog_port."""
    p = R.Pushd(
        name, PUSHD_SRC, rig.redis_port, [*PUSHD_OPTIONS, *options], workers=workers, cpu=cpu,
        **listen,
    )  # fmt: skip
    C.LIVE.append(p)
    say(f"  {name}: {cmdline(p.pid)} (pid {p.pid}) on CPU {cpu}")
    return p


def start_nchan(name: str, workers: int = 1, cpu: str = R.SERVER_CPU, sse: bool = False) -> NginxN:
    return NginxN(name, nchan_conf(sse), workers, cpu)


def redis_cpu_s(rig: R.Servers) -> float:
    return R.cpu_seconds(rig.redis.pid)


def tree_cpu_s(pid: int) -> float:
    total = 0.0
    for p in [pid, *R.children_of(pid)]:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += R.cpu_seconds(p)
    return total


# ---------------------------------------------------------------- the rows


def fanout(
    server: Any,
    kind: str,
    label: str,
    subs: int,
    msgs: int,
    rate: float,
    cpu: str = R.CLIENT_CPU,
    timeout: float = 300,
) -> dict[str, Any]:
    """bench.py fanout: `subs` subscribers of channel f, `msgs` messages from one
    publisher connection (pub.py: HTTP keep-alive, one request in flight)."""
    port = server.port
    if kind == "pushd":
        url, pub, extract = (
            f"ws://127.0.0.1:{port}/ws?channel=f",
            f"http://127.0.0.1:{port}/channels/{{ch}}",
            "scan",
        )
    else:
        url, pub, extract = (
            f"ws://127.0.0.1:{port}/sub/f",
            f"http://127.0.0.1:{port}/pub/{{ch}}",
            "raw",
        )
    args = [
        "--url",
        url,
        "--n",
        str(subs),
        "--messages",
        str(msgs),
        "--rate",
        f"{rate:g}",
        "--payload",
        "100",
        "--pub-url",
        pub,
        "--channel",
        "f",
        "--extract",
        extract,
        "--server-pid",
        str(server.pid),
        "--cpu",
        cpu,
        "--pub-cpu",
        cpu,
    ]
    r = bench_py("fanout", args, label, timeout)
    server.alive()
    bad = {
        k: r.get(k)
        for k in (
            "lost",
            "duplicates",
            "out_of_order",
            "unparsed",
            "closed_by_peer",
            "connect_failed",
        )
    }
    if kind == "pushd" and (r.get("unparsed") or 0) <= (r.get("subs_connected") or 0):
        bad["unparsed"] = 0  # pushd's {"type":"subscribed",...} frame, one per connection
    if r.get("subs_connected") != subs or any(bad.values()) or r["publisher"].get("errors"):
        PROBLEMS.append(
            f"{label}: {r.get('subs_connected')} of {subs} subscribed, {bad}, "
            f"publisher {r['publisher']}"
        )
    hc = r.get("host_cpu_busy", {})
    say(
        f"{label}: {r.get('deliveries_per_s') or 0:,.0f} deliveries/s, p50 {ms(r['lat_us_p50'])} "
        f"p99 {ms(r['lat_us_p99'])} ms; server CPU {pct(r.get('server_cpu_util'))} of one core "
        f"(its process tree), CPU0 busy {pct(hc.get('cpu0'))}, CPU1 busy {pct(hc.get('cpu1'))}; "
        f"client {r.get('client_cpu_us_per_delivery')} us/delivery; lost {r.get('lost')}"
    )
    return r


def ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.1f}"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def ingest(
    rig: R.Servers, server: Any, path: str, label: str, conns: int, seconds: int
) -> dict[str, Any]:
    """bench.py ingest (wrk -t1 -cN with the harness's post.lua); with the CPU
    of the server (process tree) and of Redis per request over the run."""
    R.wait_quiet()
    c0, r0, t0 = tree_cpu_s(server.pid), redis_cpu_s(rig), time.monotonic()
    args = [
        "--url",
        f"http://127.0.0.1:{server.port}{path}",
        "-c",
        str(conns),
        "-d",
        str(seconds),
        "--payload",
        "100",
    ]
    r = bench_py("ingest", args, label, seconds + 120)
    wall = time.monotonic() - t0
    c1, r1 = tree_cpu_s(server.pid), redis_cpu_s(rig)
    server.alive()
    n = r.get("requests") or 0
    r.pop("wrk_output", None)
    r["server_cpu_s"], r["redis_cpu_s"] = c1 - c0, r1 - r0
    r["server_cpu_util"] = (c1 - c0) / wall
    r["redis_cpu_util"] = (r1 - r0) / wall
    r["server_us_per_req"] = 1e6 * (c1 - c0) / n if n else None
    r["redis_us_per_req"] = 1e6 * (r1 - r0) / n if n else None
    if r.get("non_2xx") or r.get("socket_errors") or not n:
        PROBLEMS.append(
            f"{label}: {n} requests, non-2xx {r.get('non_2xx')}, socket errors "
            f"{r.get('socket_errors')}"
        )
    say(
        f"{label}: {r['req_per_s'] or 0:,.0f} requests/s (p99 {r['latency'].get('99')}); server "
        f"{r['server_us_per_req'] or 0:.0f} us CPU/request ({pct(r['server_cpu_util'])} of a "
        "core), "
        f"Redis {r['redis_us_per_req'] or 0:.0f} us/request ({pct(r['redis_cpu_util'])})"
    )
    return r


def post_set(
    rig: R.Servers, server: Any, who: str, tag: str, conc: list[int], seconds: int, run: int
) -> dict[str, Any]:
    paths = (
        {"channels": "/channels/ing", "push": "/push?c=ing"}
        if who == "pushd"
        else {"push": "/push?c=ing"}
    )
    out = {}
    for name, path in paths.items():
        for c in conc:
            out[f"{name}_c{c}"] = ingest(
                rig, server, path, f"r{run}-post-{tag}-{name}-c{c}", c, seconds
            )
    rig.redis_cli("DEL", "ing", "message_gateway_event")
    return out


def row_batch(rig: R.Servers, seconds: int, run: int) -> dict[str, Any]:
    p = start_pushd(rig, f"r{run}-pushd-batch")
    try:
        R.wait_quiet()
        up = uptime()
        say(f"r{run}-batch: {up}")
        note_command(
            f"taskset -c {R.CLIENT_CPU} wrk -t1 -c8 -d{seconds}s --latency -s bench/batch.lua "
            f"http://127.0.0.1:{p.port}/publish -- 400 bench"
        )
        c0 = tree_cpu_s(p.pid)
        r = R.run_wrk(
            rig,
            p,
            "/publish",
            f"r{run}-batch 400 lines",
            seconds=seconds,
            threads=1,
            conns=8,
            script=R.BATCH_LUA,
            script_args=("400", "bench"),
            log_name=f"r{run}-wrk-batch",
            echo=False,
        )
        text = r.pop("wrk_output")
        cpu = tree_cpu_s(p.pid) - c0
        r["messages_per_s"] = r["requests_per_s"] * 400
        r["uptime"] = up
        r["server_us_per_message"] = 1e6 * cpu / (r["requests"] * 400) if r["requests"] else None
        wrong = [int(x) for x in re.findall(r"wrong_count=(\d+)", text)]
        if r["non_2xx_lua"] or r["socket_errors"] or any(wrong):
            PROBLEMS.append(
                f"batch run {run}: non-2xx {r['non_2xx_lua']}, socket errors "
                f"{r['socket_errors']}, short batches {wrong}"
            )
        say(
            f"r{run}-batch: {r['messages_per_s']:,.0f} messages/s ({r['requests_per_s']:,.0f} "
            f"requests/s); pushd CPU {r['server_cpu_percent']:.0f}%, "
            f"Redis {r['redis_cpu_percent']:.0f}%, "
            f"wrk {r['client_cpu_percent']:.0f}%"
        )
        rig.redis_cli("DEL", "bench")
        return r
    finally:
        C.stop(p)


def row_idle(rig: R.Servers, n: int, run: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    order = ["pushd", "nchan"] if run % 2 else ["nchan", "pushd"]
    for kind in order:
        for proto in ("ws", "sse"):
            name = f"r{run}-{kind}-idle-{proto}"
            server = (
                start_pushd(rig, name) if kind == "pushd" else start_nchan(name, sse=proto == "sse")
            )
            try:
                time.sleep(1)  # the start's garbage collected, RSS settled
                if kind == "pushd":
                    url = (
                        f"ws://127.0.0.1:{server.port}/ws?channel=idle"
                        if proto == "ws"
                        else f"http://127.0.0.1:{server.port}/sse?channel=idle"
                    )
                else:
                    url = f"{'ws' if proto == 'ws' else 'http'}://127.0.0.1:{server.port}/sub/idle"
                r = bench_py(
                    "conns",
                    ["--url", url, "--n", str(n), "--procs", "1", "--server-pid", str(server.pid)],
                    name,
                )
                server.alive()
                if r.get("held") != n or r.get("failed"):
                    PROBLEMS.append(
                        f"{name}: held {r.get('held')} of {n}, failed {r.get('failed')}"
                    )
                say(
                    f"{name}: {r.get('held'):,} held, RSS {r['rss_before_kib'] / 1024:.1f} -> "
                    f"{r['rss_after_kib'] / 1024:.1f} MiB = {r.get('kib_per_conn')} KiB per "
                    "connection "
                    f"(process tree{': master + worker' if kind == 'nchan' else ''})"
                )
                r.pop("rss_detail_after", None)
                out[f"{kind}_{proto}"] = r
            finally:
                C.stop(server)
    return out


def row_workers(rig: R.Servers, subs: int, msgs: int, run: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    both = R.ALL_CPUS
    R.set_affinity(rig.redis.pid, both)
    try:
        order = ["pushd", "nchan"] if run % 2 else ["nchan", "pushd"]
        for kind in order:
            name = f"r{run}-{kind}-workers2"
            server = (
                start_pushd(rig, name, workers=2, cpu=both)
                if kind == "pushd"
                else start_nchan(name, workers=2, cpu=both)
            )
            try:
                out[kind] = fanout(server, kind, name, subs, msgs, 0, cpu=both)
            finally:
                C.stop(server)
    finally:
        R.set_affinity(rig.redis.pid, R.SERVER_CPU)
    return out


# Row 7: the storm's listener takes this listen queue (Twisted's default is 50; the
# kernel caps it at net.core.somaxconn), on both nodes, so a SYN waits in the queue
# instead of being dropped and retried a second later.
STORM_BACKLOG = 4096
# The history holds the `since` message and the 100 after it, with room to spare (the
# default, 100, trims approximately: the row is about the storm, not the trimming).
STORM_OPTIONS = ("--history-size", "1000")


def storm_clients(
    port: int, name: str, total: int, path: str, extra: list[str], timeout: float
) -> list[R.Child]:
    """`total` wsclient connections to `path`, all at once: --rate 0, --inflight = each
    process's share (bench/run.py's 5,000 a process, 500 per source address)."""
    nproc = max(1, -(-total // R.PER_PROCESS))
    sizes = [total // nproc + (1 if i < total % nproc else 0) for i in range(nproc)]
    children = []
    for i, size in enumerate(sizes):
        argv = [
            str(R.WSCLIENT),
            "--port", str(port),
            "--path", path,
            "--conns", str(size),
            "--src", R.SOURCES.take(max(2, -(-size // R.PER_ADDRESS))),
            "--rate", "0",
            "--inflight", str(size),
            "--connect-timeout", f"{timeout:g}",
            "--label", f"{name}-{i}",
            *extra,
        ]  # fmt: skip
        if i == 0:
            note_command(
                f"taskset -c {R.CLIENT_CPU} "
                + " ".join(argv).replace(str(R.WSCLIENT), "bench/bin/wsclient")
                + (f"  (x{nproc}, --conns {'/'.join(map(str, sizes))})" if nproc > 1 else "")
            )
        children.append(
            R.Child(f"{name}-{i}", argv, R.CLIENT_CPU, control="--control" in extra,
                    merge_stderr=False)
        )  # fmt: skip
    return children


def pushd_errors(p: R.Pushd) -> list[str]:
    """The lines of a pushd log at level warn or worse, or with a traceback (but the
    start's "no --api-key" warning)."""
    text = p.child.log_path.read_text(errors="replace")
    rx = re.compile(r"#(warn|error|critical)\]|Traceback|Unhandled")
    return [line for line in text.splitlines() if rx.search(line) and "no --api-key" not in line]


def row_storm(rig: R.Servers, n: int, msgs: int, run: int) -> dict[str, Any]:
    """A reconnect storm: `n` clients of node A resume with `since` after A was
    SIGKILLed and restarted while `msgs` messages went through node B."""
    channel = f"storm-{run}"  # a channel no earlier run published to
    tag = f"r{run}-storm"
    a = start_pushd(rig, f"{tag}-A", options=STORM_OPTIONS, backlog=STORM_BACKLOG)
    b = start_pushd(rig, f"{tag}-B", options=STORM_OPTIONS, backlog=STORM_BACKLOG)
    out: dict[str, Any] = {"clients": n, "messages": msgs, "backlog": STORM_BACKLOG}
    a2 = None
    fresh: list[R.Child] = []
    storm: list[R.Child] = []
    timeout = 60 + n / 100  # wsclient's --connect-timeout: then "done" with what it has
    try:
        say(
            f"{tag}: nodes A (pid {a.pid}, ports {a.port}/{a.backlog_port}) and B (pid {b.pid}, "
            f"port {b.port}) on Redis {rig.redis_port}; WebSocket clients on A's listener with "
            f"backlog={STORM_BACKLOG}"
        )
        # 1. The baseline: n fresh connects at once, to the last subscribed frame.
        R.wait_quiet()
        up = uptime()
        say(f"{tag} fresh: {up}")
        out["uptime_fresh"] = up
        ov0, c0 = R.listen_overflows(), R.cpu_seconds(a.pid)
        t0 = time.monotonic()
        fresh = storm_clients(
            a.backlog_port, f"{tag}-fresh", n, f"/ws?channel={channel}", ["--control"], timeout
        )
        ready = failed = 0
        for child in fresh:
            m = child.wait_for(r"^ready (\d+) failed (\d+)", timeout + 30)
            ready, failed = ready + int(m.group(1)), failed + int(m.group(2))
        fresh_s = time.monotonic() - t0
        out.update(
            fresh_s=fresh_s,
            fresh_ready=ready,
            fresh_failed=failed,
            fresh_a_cpu_s=R.cpu_seconds(a.pid) - c0,
            fresh_listen_overflows=R.listen_overflows() - ov0,
        )
        a.alive()
        say(
            f"{tag} fresh: {ready:,} of {n:,} subscribed ({failed} failed) in {fresh_s:.2f}s; "
            f"A's CPU {out['fresh_a_cpu_s']:.2f}s; {out['fresh_listen_overflows']} SYNs dropped "
            "(listen queue full)"
        )
        if ready != n or failed:
            PROBLEMS.append(f"{tag} fresh: {ready} of {n} subscribed, {failed} failed")
        # 2. The id every client has seen: the `since` they resume from.
        since = R.publish_ids(b.port, channel, 1)[0]
        time.sleep(1)  # delivered to A's clients
        # 3. A dies with its clients connected.
        os.kill(a.pid, signal.SIGKILL)
        a.child.proc.wait(10)
        C.LIVE.remove(a)
        a.child.stop()
        lost = []
        for child in fresh:
            child.send("quit")
            lost.append(child.json(30))
            child.stop()
        fresh = []
        got_since = sum(r["deliveries"] for r in lost)
        closed = sum(r["closed_by_server"] for r in lost)
        say(
            f"{tag}: published {since} through B ({got_since:,} of A's clients had it), "
            f"SIGKILLed A: {closed:,} connections lost"
        )
        out.update(since=since, since_delivered=got_since, killed_connections=closed)
        # 4. msgs messages through B while A is down.
        ids = R.publish_ids(b.port, channel, msgs)
        out["ids"] = [ids[0], ids[-1]]
        say(f"{tag}: {msgs} messages through B while A is down: {ids[0]} .. {ids[-1]}")
        # 5. A again, on its ports; the storm as soon as it serves.
        R.wait_quiet()
        up = uptime()
        say(f"{tag} storm: {up}")
        out["uptime"] = up
        t_restart = time.monotonic()
        a2 = start_pushd(
            rig, f"{tag}-A-restarted", options=STORM_OPTIONS, backlog=STORM_BACKLOG,
            port=a.port, backlog_port=a.backlog_port,
        )  # fmt: skip
        restart_s = time.monotonic() - t_restart
        ov0, c0, r0 = R.listen_overflows(), R.cpu_seconds(a2.pid), redis_cpu_s(rig)
        t0 = time.monotonic()
        storm = storm_clients(
            a2.backlog_port,
            f"{tag}-resume",
            n,
            f"/ws?channel={channel}&since={since}",
            ["--catchup", str(msgs), "--ids", f"{ids[0]},{ids[-1]}"],
            timeout,
        )
        done = failed = 0
        for child in storm:
            m = child.wait_for(r"^done (\d+) failed (\d+)", timeout + 30)
            done, failed = done + int(m.group(1)), failed + int(m.group(2))
        storm_s = time.monotonic() - t0
        reps = [child.json(30) for child in storm]
        cpu_a = R.cpu_seconds(a2.pid) - c0
        cpu_redis = redis_cpu_s(rig) - r0
        overflows = R.listen_overflows() - ov0
        for child in storm:
            child.stop()
        storm = []
        a2.alive()
        b.alive()
        cu = [r["catchup"] for r in reps]
        counts = {
            k: sum(c[k] for c in cu)
            for k in ("recovered", "not_recovered", "disorder", "extra", "bad_id", "wrong_ends")
        }
        delivered = sum(r["deliveries"] for r in reps)
        closed = sum(r["closed_by_server"] for r in reps)
        codes = dict(sum((Counter(r["close_codes"]) for r in reps), Counter()))
        lat = R.merge_latency([{"lat_us": c["done_us"]} for c in cu])
        sub = R.merge_latency([{"lat_us": c["subscribed_us"]} for c in cu])
        errors = pushd_errors(a) + pushd_errors(a2) + pushd_errors(b)
        out.update(
            storm_s=storm_s,
            restart_s=restart_s,
            storm_from_restart_s=restart_s + storm_s,
            ratio=storm_s / fresh_s if fresh_s else None,
            done=done,
            failed=failed,
            delivered=delivered,
            closed_by_server=closed,
            close_codes=codes,
            wsclient_wall_s=max(c["wall_s"] for c in cu),
            a_cpu_s=cpu_a,
            redis_cpu_s=cpu_redis,
            listen_overflows=overflows,
            catchup_ms=lat,
            subscribed_ms=sub,
            pushd_error_lines=errors[:50],
            **counts,
        )
        say(
            f"{tag} storm: {done:,} of {n:,} caught up {msgs} messages ({failed} failed) in "
            f"{storm_s:.2f}s from the clients' start ({restart_s:.2f}s before: A's restart until "
            f"it served); {storm_s / fresh_s:.2f}x the fresh connects' {fresh_s:.2f}s; recovered "
            f"{counts['recovered']:,}, not {counts['not_recovered']}, {delivered:,} messages "
            f"(disorder {counts['disorder']}, extra {counts['extra']}, bad id {counts['bad_id']}, "
            f"wrong first/last id {counts['wrong_ends']}); per client: subscribed min "
            f"{sub.get('min_ms', 0):.0f} ms p50 {sub.get('p50_ms', 0):.0f} ms max "
            f"{sub.get('max_ms', 0):.0f} ms, 100th message p50 {lat.get('p50_ms', 0):.0f} ms "
            f"p99 {lat.get('p99_ms', 0):.0f} ms max {lat.get('max_ms', 0):.0f} ms; A's CPU "
            f"{cpu_a:.2f}s, Redis {cpu_redis:.2f}s; {overflows} SYNs dropped"
        )
        bad = {k: v for k, v in counts.items() if k != "recovered" and v}
        if (
            done != n
            or failed
            or counts["recovered"] != n
            or bad
            or delivered != n * msgs
            or closed
        ):
            PROBLEMS.append(
                f"{tag}: {done} of {n} caught up, {failed} failed, recovered "
                f"{counts['recovered']}, {bad}, {delivered} of {n * msgs} messages, "
                f"{closed} closed by the server {codes}"
            )
        if errors:
            say(f"{tag}: {len(errors)} error-looking lines in the pushd logs:")
            for line in errors[:10]:
                say("    " + line)
            PROBLEMS.append(f"{tag}: {len(errors)} error-looking pushd log lines, e.g. {errors[0]}")
        return out
    finally:
        for child in fresh + storm:
            child.stop()
        for p in (a2, b):
            if p is not None:
                C.stop(p)
        if a in C.LIVE:
            C.stop(a)


def run_once(rig: R.Servers, rows: set[str], s: dict[str, Any], run: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    used = None
    if rows & {"fanout", "latency", "post"}:
        order = ["pushd", "nchan"] if run % 2 else ["nchan", "pushd"]
        for kind in order:
            name = f"r{run}-{kind}-fanout"
            server = start_pushd(rig, name) if kind == "pushd" else start_nchan(name)
            keep = False
            try:
                if "fanout" in rows:
                    res.setdefault("fanout", {})[kind] = fanout(
                        server, kind, f"r{run}-{kind}-fanout", s["subscribers"], s["messages"], 0
                    )
                if "latency" in rows:
                    res.setdefault("latency", {})[kind] = fanout(
                        server,
                        kind,
                        f"r{run}-{kind}-latency",
                        s["subscribers"],
                        s["latency_messages"],
                        s["rate"],
                    )
                if kind == "pushd" and "post" in rows and rows & {"fanout", "latency"}:
                    keep = True
                    used = server
            finally:
                if not keep:
                    C.stop(server)
    if "post" in rows:
        post: dict[str, Any] = {}
        conc, secs = s["wrk_connections"], s["wrk_seconds"]
        if used is not None:
            try:
                post["pushd_used"] = post_set(rig, used, "pushd", "pushd-used", conc, secs, run)
            finally:
                C.stop(used)
        order = ["pushd", "gateway"] if run % 2 else ["gateway", "pushd"]
        for who in order:
            if who == "pushd":
                p = start_pushd(rig, f"r{run}-pushd-post")
                try:
                    post["pushd_fresh"] = post_set(rig, p, "pushd", "pushd-fresh", conc, secs, run)
                finally:
                    C.stop(p)
            else:
                g = NginxN(
                    f"r{run}-lua-gateway",
                    (C.PEERS / "lua-gateway.conf").read_text(),
                    redis_port=rig.redis_port,
                )
                try:
                    post["gateway"] = post_set(rig, g, "gateway", "gateway", conc, secs, run)
                finally:
                    C.stop(g)
        res["post"] = post
    if "batch" in rows:
        res["batch"] = row_batch(rig, s["wrk_seconds"], run)
    if "idle" in rows:
        res["idle"] = row_idle(rig, s["idle"], run)
    if "workers" in rows:
        res["workers"] = row_workers(rig, s["subscribers"], s["messages"], run)
    if "storm" in rows:
        res["storm"] = row_storm(rig, s["storm"], s["storm_messages"], run)
    return res


# ---------------------------------------------------------------- the table


def get(run: dict[str, Any], path: tuple[str, ...]) -> Any:
    v: Any = run
    for k in path:
        if not isinstance(v, dict) or k not in v:
            return None
        v = v[k]
    return v


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def table(results: dict[str, Any], rows: set[str]) -> tuple[str, list[dict[str, Any]]]:
    s = results["settings"]
    runs = results["runs"]
    # (row, label, pushd path, peer path, peer name, higher is better, format, scale,
    #  pushd CPU path, peer CPU path, CPU format)
    spec: list[tuple] = []
    n, m, lm, rate = s["subscribers"], s["messages"], s["latency_messages"], s["rate"]
    util = ("{:.0%}", 1)
    if "fanout" in rows:
        spec.append(
            (
                "fanout",
                f"1 fan-out deliveries/s, {n:,} subs x {m}, 1 publisher conn",
                ("fanout", "pushd", "deliveries_per_s"),
                ("fanout", "nchan", "deliveries_per_s"),
                "Nchan",
                True,
                "{:,.0f}",
                1,
                ("fanout", "pushd", "server_cpu_util"),
                ("fanout", "nchan", "server_cpu_util"),
                util,
            )
        )
        spec.append(
            (
                "fanout",
                "  p99 latency during it (ms)",
                ("fanout", "pushd", "lat_us_p99"),
                ("fanout", "nchan", "lat_us_p99"),
                "Nchan",
                False,
                "{:,.0f}",
                1e-3,
                None,
                None,
                None,
            )
        )
    if "latency" in rows:
        spec.append(
            (
                "latency",
                f"2 p99 latency (ms), {n:,} subs x {rate:g} msg/s x {lm}",
                ("latency", "pushd", "lat_us_p99"),
                ("latency", "nchan", "lat_us_p99"),
                "Nchan",
                False,
                "{:,.1f}",
                1e-3,
                ("latency", "pushd", "server_cpu_util"),
                ("latency", "nchan", "server_cpu_util"),
                util,
            )
        )
        spec.append(
            (
                "latency",
                "  p50 latency (ms)",
                ("latency", "pushd", "lat_us_p50"),
                ("latency", "nchan", "lat_us_p50"),
                "Nchan",
                False,
                "{:,.1f}",
                1e-3,
                None,
                None,
                None,
            )
        )
    if "post" in rows:
        usr = ("{:.0f} us/req", 1)
        for which, tag in (("pushd_fresh", "fresh"), ("pushd_used", "after 1-2")):
            for name, path in (("channels", "/channels/{c}"), ("push", "/push?c=")):
                for c in s["wrk_connections"]:
                    spec.append(
                        (
                            "post",
                            f"3 POST/s c{c}, pushd {path} ({tag}) vs gateway /push",
                            ("post", which, f"{name}_c{c}", "req_per_s"),
                            ("post", "gateway", f"push_c{c}", "req_per_s"),
                            "gateway",
                            True,
                            "{:,.0f}",
                            1,
                            ("post", which, f"{name}_c{c}", "server_us_per_req"),
                            ("post", "gateway", f"push_c{c}", "server_us_per_req"),
                            usr,
                        )
                    )
        for which, tag in (("pushd_fresh", "fresh"), ("pushd_used", "after 1-2")):
            c = s["wrk_connections"][0]
            spec.append(
                (
                    "post",
                    f"  Redis CPU/req, /channels c{c} ({tag}) vs gateway",
                    ("post", which, f"channels_c{c}", "redis_us_per_req"),
                    ("post", "gateway", f"push_c{c}", "redis_us_per_req"),
                    "gateway",
                    False,
                    "{:.0f} us",
                    1,
                    None,
                    None,
                    None,
                )
            )
    if "batch" in rows:
        spec.append(
            (
                "batch",
                "4 batch msgs/s, POST /publish 400 lines, wrk -c8",
                ("batch", "messages_per_s"),
                None,
                "-",
                True,
                "{:,.0f}",
                1,
                ("batch", "server_us_per_message"),
                None,
                ("{:.1f} us/msg", 1),
            )
        )
    if "idle" in rows:
        for proto in ("ws", "sse"):
            spec.append(
                (
                    "idle",
                    f"5 idle KiB/conn, {s['idle']:,} {'WebSocket' if proto == 'ws' else 'SSE'}",
                    ("idle", f"pushd_{proto}", "kib_per_conn"),
                    ("idle", f"nchan_{proto}", "kib_per_conn"),
                    "Nchan",
                    False,
                    "{:.2f}",
                    1,
                    None,
                    None,
                    None,
                )
            )
    if "workers" in rows:
        spec.append(
            (
                "workers",
                f"6 fan-out, 2 workers, {n:,} x {m}, 1 publisher conn",
                ("workers", "pushd", "deliveries_per_s"),
                ("workers", "nchan", "deliveries_per_s"),
                "Nchan 2w",
                True,
                "{:,.0f}",
                1,
                ("workers", "pushd", "server_cpu_util"),
                ("workers", "nchan", "server_cpu_util"),
                util,
            )
        )
    if "storm" in rows:
        k = s["storm"]
        cpu_s = ("{:.1f} s", 1)
        for label, key, fmt, cpu in (
            (
                f"7 reconnect storm s: {k:,} resume x {s['storm_messages']} after SIGKILL",
                "storm_s",
                "{:.2f}",
                "a_cpu_s",
            ),
            (f"  {k:,} fresh connects s (the baseline)", "fresh_s", "{:.2f}", "fresh_a_cpu_s"),
            ("  storm / fresh (target <= 2x)", "ratio", "{:.2f}x", None),
            ("  clients recovered:true", "recovered", "{:,.0f}", None),
            ("  clients recovered:false", "not_recovered", "{:,.0f}", None),
        ):
            spec.append(
                (
                    "storm",
                    label,
                    ("storm", key),
                    None,
                    "-",
                    False,
                    fmt,
                    1,
                    ("storm", cpu) if cpu else None,
                    None,
                    cpu_s if cpu else None,
                )
            )

    def vals(path: tuple | None, scale: float) -> list[float]:
        if path is None:
            return []
        return [v * scale for r in runs if (v := get(r, path)) is not None]

    def loads(path: tuple | None) -> str:
        if path is None:
            return ""
        out = []
        for r in runs:
            up = get(r, (*path[:-1], "uptime"))
            m = re.search(r"load average: ([\d.]+)", up or "")
            out.append(m.group(1) if m else "?")
        return " ".join(out)

    lines = [
        (
            "row",
            "pushd",
            "peer",
            "ratio",
            "server CPU pushd | peer",
            "runs pushd | peer",
            "load 1m pushd | peer",
        )
    ]
    summary = []
    for _row, label, mine, theirs, peer, higher, fmt, scale, mcpu, tcpu, cfmt in spec:
        a, b = vals(mine, scale), vals(theirs, scale)
        if not a and not b:
            continue
        ma, mb = med(a), med(b)
        ratio, value = "-", None
        if ma and mb:
            value = ma / mb if higher else mb / ma
            ratio = f"{value:.2f}x"
        cpu = "-"
        if cfmt:
            ca, cb = med(vals(mcpu, 1)), med(vals(tcpu, 1))
            f = cfmt[0]
            sa = "-" if ca is None else f.format(ca)
            sb = "-" if cb is None else f.format(cb)
            cpu = f"{sa} | {sb}"

        def show(v: float | None, fmt: str = fmt) -> str:
            return "-" if v is None else fmt.format(v)

        lines.append(
            (
                label,
                show(ma),
                f"{show(mb)} {peer}" if b else "-",
                ratio,
                cpu,
                " ".join(show(v) for v in a) + " | " + (" ".join(show(v) for v in b) or "-"),
                f"{loads(mine)} | {loads(theirs) or '-'}",
            )
        )
        summary.append(
            {
                "row": label.strip(),
                "pushd": ma,
                "peer": mb,
                "peer_name": peer,
                "ratio": value,
                "ratio_is": "pushd/peer" if higher else "peer/pushd",
                "pushd_runs": a,
                "peer_runs": b,
            }
        )
    widths = [max(len(line[i]) for line in lines) for i in range(7)]
    text = [
        "  ".join(
            c.ljust(w) if i in (0, 4, 5, 6) else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]
    rule = "-" * max(len(t) for t in text)
    return "\n".join([rule, text[0], rule, *text[1:], rule]), summary


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=1, help="runs of every row; medians are shown [1]")
    ap.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    ap.add_argument("--only", default="", help=f"rows: {','.join(ROWS)} or their numbers 1-7")
    ap.add_argument("--subscribers", type=int, help="rows 1, 2, 6 [10000; quick 1000]")
    ap.add_argument("--messages", type=int, help="rows 1, 6 [100; quick 50]")
    ap.add_argument("--rate", type=float, default=5.0, help="row 2: msg/s [5]")
    ap.add_argument("--latency-messages", type=int, help="row 2 [20; quick 10]")
    ap.add_argument("--wrk-seconds", type=int, help="rows 3, 4: each wrk run [5; quick 2]")
    ap.add_argument("--wrk-connections", default="50,8", help="row 3 [50,8]")
    ap.add_argument("--idle", type=int, help="row 5: connections [15000; quick 2000]")
    ap.add_argument("--storm", type=int, help="row 7: clients [15000; quick 2000]")
    ap.add_argument("--storm-messages", type=int, default=100, help="row 7: messages [100]")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds to wait in all for other processes to leave the CPUs [60; quick 0]",
    )
    ap.add_argument("--pushd-src", type=Path, default=ROOT, help="run pushd from this source tree")
    args = ap.parse_args()
    global PUSHD_SRC
    PUSHD_SRC = args.pushd_src
    q = args.quick
    rows = C.parse_rows(args.only, ap, ROWS) or set(ROWS)
    settings = {
        "subscribers": args.subscribers or (1000 if q else 10000),
        "messages": args.messages or (50 if q else 100),
        "rate": args.rate,
        "latency_messages": args.latency_messages or (10 if q else 20),
        "wrk_seconds": args.wrk_seconds or (2 if q else 5),
        "wrk_connections": [int(x) for x in args.wrk_connections.split(",")],
        "idle": args.idle or (2000 if q else 15000),
        "storm": args.storm or (2000 if q else 15000),
        "storm_messages": args.storm_messages,
        "publisher_connections": 1,
        "requests_in_flight": 1,
        "payload_bytes": 100,
        "pushd_options": PUSHD_OPTIONS,
    }
    R.QUIET_WAIT = args.quiet_wait if args.quiet_wait is not None else (0.0 if q else 60.0)

    R.prepare_driver(("redis-server", "redis-cli", "wrk", "gcc", "taskset", "nginx", "uptime"))
    if (os.cpu_count() or 1) < 2:
        raise R.BenchError("needs two CPUs")
    os.sched_setaffinity(0, {int(R.CLIENT_CPU)})
    shutil.rmtree(OUT, ignore_errors=True)
    RESULTS.unlink(missing_ok=True)
    OUT.mkdir(parents=True)
    R.OUT = OUT
    C.OUT = OUT
    setup_harness()
    if "storm" in rows:
        R.build_wsclient()

    results: dict[str, Any] = {
        "mode": "quick" if q else "full",
        "runs_wanted": args.runs,
        "rows": sorted(rows, key=ROWS.index),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "argv": sys.argv,
        "pushd_source": R.describe_source(PUSHD_SRC),
        "harness": str(HARNESS),
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        "uptime_start": uptime(),
        "settings": settings,
        "runs": [],
    }
    say(
        f"harness ({results['mode']}, {args.runs} run(s); rows {','.join(results['rows'])}): "
        "servers + "
        f"Redis on CPU {R.SERVER_CPU}, clients on CPU {R.CLIENT_CPU} (row 6: both); pushd "
        f"{results['pushd_source']} {' '.join(PUSHD_OPTIONS)}; {results['nginx']}; "
        f"harness {HARNESS}; "
        f"{results['uptime_start']}"
    )
    storm_load = f"; row 7: {settings['storm']:,} clients resuming {settings['storm_messages']}"
    say(
        f"load: {settings['subscribers']:,} subscribers of one channel, "
        f"{settings['messages']} messages "
        f"(row 1) / {settings['latency_messages']} at {settings['rate']:g} msg/s (row 2), "
        "ONE publisher "
        f"connection with one request in flight, {settings['payload_bytes']}-byte payload; wrk -t1 "
        f"-c{'/-c'.join(map(str, settings['wrk_connections']))} -d{settings['wrk_seconds']}s; "
        f"{settings['idle']:,} idle connections" + (storm_load if "storm" in rows else "")
    )
    try:
        rig = R.Servers(PUSHD_SRC, pushd=False)
        say(f"redis-server pid {rig.redis.pid}: {cmdline(rig.redis.pid)}")
        for run in range(1, args.runs + 1):
            say(f"--- run {run} of {args.runs}")
            results["runs"].append(run_once(rig, rows, settings, run))
    finally:
        C.stop_live()
        R.Child.stop_all()
    results["total_s"] = time.monotonic() - R.T0
    text, summary = table(results, rows)
    results["table"] = summary
    results["problems"] = PROBLEMS
    results["other_load"] = R.OTHER_LOAD
    results["commands"] = COMMANDS
    results["uptime_end"] = uptime()
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    s = settings
    print()
    print(
        f"pushd vs Nchan / nginx+Lua gateway, shared harness ({results['mode']}, median of "
        f"{args.runs} run(s), {results['total_s']:.0f}s; raw: {RESULTS.relative_to(ROOT)})"
    )
    print(text)
    notes = [
        "ratio: how many times better pushd is (pushd/peer, or peer/pushd where lower is better)",
        f"load: rows 1, 6: {s['subscribers']:,} WebSocket subscribers of one channel, "
        f"{s['messages']} "
        f"messages back-to-back; row 2: {s['latency_messages']} messages at {s['rate']:g} "
        "msg/s; ONE "
        "publisher connection (pub.py, HTTP keep-alive, 1 request in flight), 100-byte payload",
        "server CPU: rows 1, 2, 6: utilisation of one core by the server's process tree from the "
        "first publish to the last delivery (bench.py server_cpu_util); row 3: CPU us per request "
        "(process tree, Redis apart); row 4: pushd CPU us per message",
        f"row 3: bench.py ingest = wrk -t1 -cN -d{s['wrk_seconds']}s -s post.lua, 100-byte "
        "text/plain; "
        "'after 1-2': the pushd process that served rows 1-2",
        "load 1m: the 1-minute load average (uptime) just before each figure's measurement; "
        "another session's tests may share the machine",
        "row 5: RSS of the process tree (Nchan: master + worker), a fresh server for each",
        f"row 7: pushd only (Nchan: no equivalent, no `recovered` promise to check); nodes A "
        f"and B on one Redis, {' '.join(STORM_OPTIONS)}, WebSocket listener backlog="
        f"{STORM_BACKLOG}; {s['storm']:,} wsclient connections at once (--rate 0, 5,000 a "
        "process); fresh: start to the last subscribed frame; storm: the resuming clients' "
        "start (A restarted, serving) to the last one's last message (wsclient's --connect-"
        "timeout, 60 s + 1 s per 100 clients, when some never get there: checks FAILED); "
        "server CPU: A's",
        f"pushd runs with {' '.join(PUSHD_OPTIONS)} (the harness opens all its connections "
        "from one address)",
        f"load average at the start: {results['uptime_start']}; "
        f"at the end: {results['uptime_end']}",
    ]
    for note in notes:
        print("note: " + note)
    if R.OTHER_LOAD:
        print("note: other processes shared the servers' CPU: " + "; ".join(R.OTHER_LOAD))
    if PROBLEMS:
        print("checks FAILED:\n  " + "\n  ".join(PROBLEMS))
        return 1
    print("checks: every subscriber connected, no delivery lost or duplicated, every POST 2xx")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        C.stop_live()
        R.Child.stop_all()
        print("interrupted; all children stopped", file=sys.stderr)
        sys.exit(130)
    except R.BenchError as e:
        C.stop_live()
        R.Child.stop_all()
        print(f"harness: error: {e}", file=sys.stderr)
        sys.exit(1)
