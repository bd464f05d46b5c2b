#!/usr/bin/env python3
"""pushd next to its peers, under the same load: Nchan (nginx + Nchan, memory
store) and the nginx+Lua gateway pushd replaces (POST /push into Redis lists).

    python bench/compare.py [--runs 3] [--quick] [--only idle,fanout,...]

Rows (--only takes their names or numbers; ratio = how many times better pushd is):
  1 idle      RSS per idle WebSocket (KiB), 15,000 connections
  2 fanout    fan-out deliveries/s, max rate: 10,000 subscribers x 100 messages from
              16 keep-alive publisher connections
  3 latency   fan-out latency p50/p99, same subscribers, 5 msg/s
  4 post      single POSTs/s (wrk): pushd /channels and /push vs the gateway's /push,
              Nchan's /pub
  5 batch     batch msgs/s, POST /publish of 1,000 lines (pushd only)
  6 conns     connections held: pushd --workers 2 vs Nchan's 1 worker
  7 onepub    fan-out deliveries/s as row 2 from ONE publisher connection (HTTP
              keep-alive, one request in flight, back to back)
  8 sse       RSS per idle SSE connection (KiB), 15,000: pushd /sse vs Nchan's
              EventSource subscriber (the shared harness's pushclient)
  9 workers   both cores, nothing pinned: pushd --workers 2 vs Nchan worker_processes
              2, fan-out 10,000 x 100 from ONE publisher connection

Starts redis-server, then for each row and each run a fresh pushd (Redis broker)
and a fresh peer (nginx with one worker, from the templates in bench/peers/), one
after the other, all pinned to CPU 0; the load (bench/bin/wsclient, the publisher
in this process, wrk; row 8: pushclient) runs on CPU 1. Rows 2, 3 and 7 share one
server and one set of subscribers. Row 9 pins nothing. Prints one table: each
figure the median of the runs (and the runs themselves), the ratio saying how many
times better pushd is (pushd/peer, or peer/pushd where lower is better). Logs, the
nginx configs and prefixes go to bench/out/compare/, the raw figures to
bench/out/compare.json. See bench/README.md ("pushd next to its peers").

Reuses bench/run.py's machinery (Child, Pushd, ClientSet, burst_phase, run_wrk,
CpuMeter, ...) and bench/harness.py's build of the shared harness's pushclient.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as R  # bench/run.py

BENCH = R.BENCH
ROOT = R.ROOT
PEERS = BENCH / "peers"
OUT = R.OUT / "compare"  # logs, nginx configs and prefixes
RESULTS = R.OUT / "compare.json"
PUSH_LUA = BENCH / "push.lua"
PUSHCLIENT: Path | None = None  # the shared harness's client (row 8), built by main
SSE_PER_PROCESS = 1000  # row 8: pushclient connections a process, one source address each
# Nchan's EventSource subscriber on the WebSocket one's location (bench/harness.py's
# nchan_conf(sse=True)): Accept: text/event-stream makes a request an SSE subscriber.
NCHAN_SSE = {"nchan_subscriber websocket;": "nchan_subscriber websocket eventsource;"}
NGINX_MODULES = Path("/usr/lib/nginx/modules")

# --only, also 1..9 (7-9 came later: the first six keep their numbers)
ROWS = ("idle", "fanout", "latency", "post", "batch", "conns", "onepub", "sse", "workers")
CHANNEL = R.CHANNEL
PUBLISHERS = 16  # row 2's publisher connections (R.PUBLISHERS); rows 7 and 9: one
PROBLEMS: list[str] = []
PUSHD_SRC = ROOT  # --pushd-src
CLIENT_BOUND: list[str] = []  # wrk runs where wrk itself was near its limit

say = R.say
BenchError = R.BenchError
DASH = "\u2013"  # no figure


# ---------------------------------------------------------------- the peers


class Nginx:
    """nginx with one worker from a template of bench/peers/ (@PORT@, @PREFIX@,
    @LOG@, @REDIS_PORT@ filled in; the result goes to bench/out/compare/), run as
    `nginx -c <conf> -p <prefix> -g 'daemon off;'` on CPU 0. Quacks like run.py's
    Pushd where burst_phase and run_wrk need it (`port`, `server_pids`, `alive`).

    `workers`: worker_processes N instead of the template's 1 (row 9); `cpu`: where
    it runs [CPU 0]; `edits`: text replaced in the template (row 8: Nchan's
    EventSource subscriber)."""

    def __init__(
        self,
        name: str,
        template: str,
        redis_port: int = 0,
        *,
        workers: int = 1,
        cpu: str | None = None,
        edits: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.port = R.free_port()
        prefix = OUT / name
        shutil.rmtree(prefix, ignore_errors=True)
        prefix.mkdir(parents=True)
        self.error_log = OUT / f"{name}-error.log"
        self.error_log.unlink(missing_ok=True)
        conf = OUT / f"{name}.conf"
        text = (PEERS / template).read_text()
        if workers != 1:
            edits = {"worker_processes 1;": f"worker_processes {workers};", **(edits or {})}
        for old, new in (edits or {}).items():
            if old not in text:
                raise BenchError(f"{name}: no {old!r} in {PEERS / template}")
            text = text.replace(old, new)
        for key, value in {
            "@PORT@": str(self.port),
            "@PREFIX@": str(prefix),
            "@LOG@": str(self.error_log),
            "@REDIS_PORT@": str(redis_port),
        }.items():
            text = text.replace(key, value)
        conf.write_text(text)
        argv = ["nginx", "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"]
        # R.SERVER_CPU read now: bench/harness.py's NginxN sets it around this call.
        self.child = R.Child(name, argv, cpu or R.SERVER_CPU)
        self.child.collect = False
        self.pid = self.child.pid
        LIVE.append(self)
        self._wait_up()
        self.server_pids = R.children_of(self.pid)
        deadline = time.monotonic() + 5  # the master forks its workers one after another
        while len(self.server_pids) < workers and time.monotonic() < deadline:
            time.sleep(0.05)
            self.server_pids = R.children_of(self.pid)
        if len(self.server_pids) != workers:
            raise BenchError(f"{name}: {len(self.server_pids)} worker processes, not {workers}")
        self.worker = self.server_pids[0]

    def _wait_up(self, timeout: float = 10) -> None:
        """Until GET /health answers 200 (the master opened the port before it
        started the worker; this waits for the worker)."""
        deadline = time.monotonic() + timeout
        while True:
            self.alive()
            try:
                if R.get_status(self.port, "/health") == 200:
                    return
            except (TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no 200 on /health in {timeout:.0f}s; see "
                                 f"{self.error_log} and {self.child.log_path}")  # fmt: skip
            time.sleep(0.05)

    def alive(self) -> None:
        if self.child.proc.poll() is not None:
            raise BenchError(
                f"{self.name} exited (code {self.child.proc.returncode}); see "
                f"{self.child.log_path} and {self.error_log}"
            )
        if getattr(self, "server_pids", None) and R.children_of(self.pid) != self.server_pids:
            raise BenchError(f"{self.name}: its worker was restarted; see {self.error_log}")

    def stop(self) -> None:
        workers = R.children_of(self.pid)
        self.child.stop(timeout=10)  # SIGTERM: nginx's fast shutdown stops the worker
        for pid in workers:  # should the master have been killed before
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    ours = b"nginx: worker" in f.read()
                if ours:
                    os.kill(pid, signal.SIGKILL)
                    say(f"  {self.name}: killed worker {pid}, left by its master")
            except (FileNotFoundError, ProcessLookupError):
                pass
        if self in LIVE:
            LIVE.remove(self)


LIVE: list[Any] = []  # servers started by a row, stopped at the end whatever happens


def start_pushd(rig: R.Servers, name: str, workers: int = 1, cpu: str | None = None) -> R.Pushd:
    """A fresh pushd (Redis broker, its defaults) on CPU 0 (or `cpu`)."""
    p = R.Pushd(name, PUSHD_SRC, rig.redis_port, workers=workers, cpu=cpu or R.SERVER_CPU)
    LIVE.append(p)
    return p


def stop(server: Any) -> None:
    server.stop()
    if server in LIVE:
        LIVE.remove(server)


def stop_live() -> None:
    for server in reversed(list(LIVE)):
        try:
            stop(server)
        except Exception as e:  # keep stopping the others
            print(f"stopping {server}: {e}", file=sys.stderr)


def nchan_subscribers(port: int, channel: str) -> int:
    """Nchan's count of the channel's subscribers (GET on the publisher location)."""

    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await R._request(reader, writer, port, f"/pub/{channel}")
        finally:
            writer.close()

    status, answer = asyncio.run(asyncio.wait_for(go(), 10))
    if status == 404:  # no such channel (yet)
        return 0
    m = re.search(rb"active subscribers: (\d+)", answer)
    if status != 200 or not m:
        raise BenchError(f"GET /pub/{channel} answered {status}: {answer[:200]!r}")
    return int(m.group(1))


def wait_subscribed(server: Any, channel: str, want: int, timeout: float = 20) -> None:
    """With Nchan, wsclient --raw counts a connection open at 101: wait until Nchan
    itself counts every subscriber before publishing (bounded)."""
    if not isinstance(server, Nginx):
        return
    deadline = time.monotonic() + timeout
    while (n := nchan_subscribers(server.port, channel)) < want:
        if time.monotonic() > deadline:
            PROBLEMS.append(f"{server.name}: {n} of {want} subscribers of {channel!r} after "
                            f"{timeout:.0f}s")  # fmt: skip
            return
        time.sleep(0.1)


def rss_total(pids: list[int]) -> int:
    return sum(R.rss_kib(pid) for pid in pids)


def held_figures(
    server: Any, held: int, rss0: int, rss1: int, connect_s: float, master0: int
) -> dict[str, Any]:
    """An idle row's figures: `held` connections took the server's RSS from
    `rss0` to `rss1` (KiB) in `connect_s` seconds (Nginx: its master's change too)."""
    out: dict[str, Any] = {
        "connections": held,
        "rss_before_kib": rss0,
        "rss_held_kib": rss1,
        "kib_per_connection": (rss1 - rss0) / held if held else float("nan"),
        "connects_per_s": held / connect_s,
    }
    if isinstance(server, Nginx):
        out["master_rss_delta_kib"] = R.rss_kib(server.pid) - master0
    return out


def report_held(
    out: dict[str, Any], label: str, run: int, what: str, closed: int
) -> dict[str, Any]:
    """Say an idle row's figures (`held_figures`'s `out`, with `closed`, the
    connections the server closed, which is a problem) and return them."""
    out["closed_by_server"] = closed
    if closed:
        PROBLEMS.append(f"{label}): the server closed {closed}")
    master = (f"; master {out['master_rss_delta_kib']:+,} KiB"
              if "master_rss_delta_kib" in out else "")  # fmt: skip
    say(
        f"{label}, run {run}): {out['connections']:,} {what} held; RSS "
        f"{out['rss_before_kib'] / 1024:.1f} -> {out['rss_held_kib'] / 1024:.1f} MiB = "
        f"{out['kib_per_connection']:.2f} KiB per connection{master}; "
        f"{out['connects_per_s']:,.0f} connects/s"
    )
    return out


def settled_rss(pids: list[int], tries: int = 20) -> int:
    """RSS (KiB, summed) once it stopped moving: the handshakes' garbage is freed."""
    last = rss_total(pids)
    for _ in range(tries):
        time.sleep(0.5)
        now = rss_total(pids)
        if abs(now - last) < 256:
            return now
        last = now
    return last


# ---------------------------------------------------------------- the sides


class Side:
    """What a row needs to know about one server: how to start it, its WebSocket
    and publish URLs, whether its frames are pushd's."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # pushd | nchan
        self.raw = kind == "nchan"

    def start(
        self, rig: R.Servers, name: str, *, sse: bool = False, workers: int = 1,
        cpu: str | None = None,
    ) -> Any:  # fmt: skip
        if self.kind == "pushd":
            return start_pushd(rig, name, workers, cpu)
        return Nginx(name, "nchan.conf", workers=workers, cpu=cpu,
                     edits=NCHAN_SSE if sse else None)  # fmt: skip

    def ws_path(self, channel: str) -> str:
        return f"/sub/{channel}" if self.raw else f"/ws?channel={channel}"

    def sse_path(self, channel: str) -> str:
        return f"/sub/{channel}" if self.raw else f"/sse?channel={channel}"

    def pub_path(self, channel: str) -> str | None:
        return f"/pub/{channel}" if self.raw else None  # None: pushd's /channels/<c>

    def rss_pids(self, server: Any) -> list[int]:
        return [server.worker] if isinstance(server, Nginx) else list(server.server_pids)


PUSHD, NCHAN = Side("pushd"), Side("nchan")


def clients_check(name: str, clients: R.ClientSet, held: int, want: int) -> None:
    if held != want:
        PROBLEMS.append(f"{name}: {held:,} of {want:,} connections subscribed")


# ---------------------------------------------------------------- the rows


def row_idle(rig: R.Servers, side: Side, n: int, run: int) -> dict[str, Any]:
    """Row 1: the server's RSS before and with `n` idle subscribed WebSockets."""
    name = f"{side.kind}-idle-{run}"
    server = side.start(rig, name)
    try:
        pids = side.rss_pids(server)
        master0 = R.rss_kib(server.pid) if isinstance(server, Nginx) else 0
        rss0 = settled_rss(pids, tries=4)
        t0 = time.monotonic()
        clients = R.ClientSet(server.port, name, n, side.ws_path("idle"), idle=True, raw=side.raw)
        held = clients.wait_ready()
        connect_s = time.monotonic() - t0
        clients_check(f"idle ({side.kind})", clients, held, n)
        wait_subscribed(server, "idle", held)
        rss1 = settled_rss(pids)
        out = held_figures(server, held, rss0, rss1, connect_s, master0)
        finals = clients.quit()
        closed = sum(r["closed_by_server"] for r in finals)
        return report_held(out, f"idle ({side.kind}", run, "connections", closed)
    finally:
        stop(server)


def paced_phase(
    rig: R.Servers,
    server: Any,
    side: Side,
    clients: R.ClientSet,
    held: int,
    rate: float,
    msgs: int,
    label: str,
) -> dict[str, Any]:
    """`msgs` messages paced at `rate`/s (bench/run.py's latency test)."""
    R.wait_quiet()
    clients.expect(msgs, idle_ms=5000, max_ms=int(60_000 + 1000 * msgs / rate))
    cpu = R.CpuMeter(server.server_pids, rig.redis.pid)
    elapsed, statuses = R.publish_paced(server.port, msgs, rate, path=side.pub_path(CHANNEL))
    reps = clients.reports(timeout=90 + msgs * held / 20_000)
    server_cpu, redis_cpu, other = cpu.percent(label)
    rig.alive()
    server.alive()
    deliveries = sum(r["deliveries"] for r in reps)
    client_cpu = sum(r["cpu_s"] for r in reps)
    return {
        "rate": rate,
        "messages": msgs,
        "publish_s": elapsed,
        "post_status": dict(statuses),
        "deliveries": deliveries,
        "expected": msgs * held,
        "missing": msgs * held - deliveries,
        "client_cpu_us_per_delivery": client_cpu * 1e6 / deliveries if deliveries else 0,
        "server_cpu_percent": server_cpu,
        "redis_cpu_percent": redis_cpu,
        "other_cpu0_percent": other,
        **R.merge_latency(reps),
    }


def post_ok(statuses: dict[int, int]) -> bool:
    return all(200 <= code < 300 for code in statuses)


def row_fanout(
    rig: R.Servers,
    side: Side,
    subs: int,
    burst: int,
    rate: float,
    lat_msgs: int,
    phases: set[str],
    run: int,
) -> dict[str, Any]:
    """Rows 2, 7 and 3, on one server and one set of subscribers: `subs` WebSocket
    subscribers of one channel; a burst of `burst` messages from R.PUBLISHERS (16)
    keep-alive publisher connections (max rate, row 2), the same burst from ONE
    (one request in flight, back to back: row 7), then `lat_msgs` paced at
    `rate`/s (row 3)."""
    name = f"{side.kind}-fanout-{run}"
    server = side.start(rig, name)
    try:
        clients = R.ClientSet(server.port, name, subs, side.ws_path(CHANNEL), raw=side.raw)
        held = clients.wait_ready()
        clients_check(f"fan-out ({side.kind})", clients, held, subs)
        wait_subscribed(server, CHANNEL, held)
        out: dict[str, Any] = {"subscribers": held}
        if "fanout" in phases:
            label = f"fan-out {held:,} ({side.kind}, run {run})"
            b = R.burst_phase(
                rig, clients, label, held, burst, R.PUBLISHERS, target=server,
                path=side.pub_path(CHANNEL),
            )  # fmt: skip
            b.pop("latency", None)
            out["max_rate"] = b
            if b["missing"] or not post_ok(b["post_status"]):
                PROBLEMS.append(f"{label}: {b['missing']:,} deliveries missing, POST statuses "
                                f"{b['post_status']}")  # fmt: skip
        if "onepub" in phases:
            label = f"fan-out {held:,}, 1 publisher ({side.kind}, run {run})"
            b = R.burst_phase(
                rig, clients, label, held, burst, 1, target=server, path=side.pub_path(CHANNEL),
            )  # fmt: skip
            b.pop("latency", None)
            out["one_publisher"] = b
            if b["missing"] or not post_ok(b["post_status"]):
                PROBLEMS.append(f"{label}: {b['missing']:,} deliveries missing, POST statuses "
                                f"{b['post_status']}")  # fmt: skip
        if "latency" in phases:
            label = f"fan-out {held:,} latency ({side.kind}, run {run})"
            lat = paced_phase(rig, server, side, clients, held, rate, lat_msgs, label)
            out["latency"] = lat
            if lat["missing"] or not post_ok(lat["post_status"]):
                PROBLEMS.append(f"{label}: {lat['missing']:,} deliveries missing, POST statuses "
                                f"{lat['post_status']}")  # fmt: skip
            say(R.latency_line(label, rate, held, lat))
        finals = clients.quit()
        out["closed_by_server"] = sum(r["closed_by_server"] for r in finals)
        if out["closed_by_server"]:
            PROBLEMS.append(f"fan-out ({side.kind}): the server closed "
                            f"{out['closed_by_server']} subscribers")  # fmt: skip
        return out
    finally:
        stop(server)


def wrk_row(
    rig: R.Servers,
    server: Any,
    path: str,
    label: str,
    script: Path,
    seconds: int,
    conns: int,
    script_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    r = R.run_wrk(
        rig, server, path, label, seconds=seconds, threads=1, conns=conns, script=script,
        script_args=script_args, log_name=f"wrk-{label.replace(' ', '-').replace('/', '')}",
        echo=False,
    )  # fmt: skip
    out = r.pop("wrk_output")
    bad = re.search(r"\bbad=(\d+)", out)
    r["bad_answers"] = int(bad.group(1)) if bad else 0
    wrong = re.search(r"wrong_count=(\d+)", out)
    r["wrong_count"] = int(wrong.group(1)) if wrong else 0
    failed = r["non_2xx_lua"] + r["socket_errors"] + r["bad_answers"] + r["wrong_count"]
    if failed:
        PROBLEMS.append(
            f"{label}: non-2xx {r['non_2xx_lua']}, socket errors {r['socket_errors']}, "
            f"bad answers {r['bad_answers']}, short batches {r['wrong_count']}"
        )
    if r["client_cpu_percent"] > 80:  # wrk -t1 is one thread on CPU 1
        CLIENT_BOUND.append(f"{label}: wrk {r['client_cpu_percent']:.0f}% of CPU 1")
    say(
        f"{label}: {r['requests_per_s']:,.0f} requests/s, latency p50 {r['p50_ms']:.2f} ms "
        f"p99 {r['p99_ms']:.2f} ms; failures {failed}; server CPU "
        f"{r['server_cpu_percent']:.0f}%, redis {r['redis_cpu_percent']:.0f}%, wrk "
        f"{r['client_cpu_percent']:.0f}%"
    )
    return r


def gateway_lists(rig: R.Servers, label: str, responses: int) -> int:
    """After a /push run: the channel's list must hold an entry per answer at least
    (wrk does not count the requests in flight when it stops). Emptied for the next."""
    n = int(rig.redis_cli("LLEN", CHANNEL))
    events = int(rig.redis_cli("LLEN", "message_gateway_event"))
    if n < responses or events < responses:
        PROBLEMS.append(f"{label}: {n:,} list entries and {events:,} events for "
                        f"{responses:,} answers")  # fmt: skip
    rig.redis_cli("DEL", CHANNEL, "message_gateway_event")
    return n


def row_post(rig: R.Servers, which: set[str], seconds: int, conns: int, run: int) -> dict[str, Any]:
    """Row 4: single POSTs with wrk, in turn: pushd's /channels/<c> and /push?c=<c>,
    the nginx+Lua gateway's /push?c=<c>, Nchan's /pub/<c>. Row 5: pushd's
    POST /publish of 1,000 NDJSON lines."""
    out: dict[str, Any] = {}
    rig.redis_cli("DEL", CHANNEL, "message_gateway_event")
    order = ["pushd", "lua", "nchan"] if run % 2 else ["nchan", "lua", "pushd"]
    for who in order:
        if who == "pushd" and which & {"post", "batch"}:
            p = start_pushd(rig, f"pushd-post-{run}")
            try:
                if "post" in which:
                    out["pushd_channels"] = wrk_row(
                        rig, p, f"/channels/{CHANNEL}", f"POST pushd /channels run {run}",
                        R.POST_LUA, seconds, conns,
                    )  # fmt: skip
                    r = out["pushd_push"] = wrk_row(
                        rig, p, f"/push?c={CHANNEL}", f"POST pushd /push run {run}",
                        PUSH_LUA, seconds, conns,
                    )  # fmt: skip
                    r["list_entries"] = gateway_lists(rig, "pushd /push", r["responses_lua"])
                if "batch" in which:
                    r = out["pushd_batch"] = wrk_row(
                        rig, p, "/publish", f"batch pushd 1000 lines run {run}", R.BATCH_LUA,
                        seconds, conns, script_args=("1000", CHANNEL),
                    )  # fmt: skip
                    r["messages_per_s"] = r["requests_per_s"] * 1000
                    say(f"batch pushd run {run}: {r['messages_per_s']:,.0f} messages/s")
            finally:
                stop(p)
        elif who == "lua" and "post" in which:
            g = Nginx(f"lua-gateway-{run}", "lua-gateway.conf", rig.redis_port)
            try:
                r = out["lua_push"] = wrk_row(
                    rig, g, f"/push?c={CHANNEL}", f"POST lua-gateway /push run {run}",
                    PUSH_LUA, seconds, conns,
                )  # fmt: skip
                r["list_entries"] = gateway_lists(rig, "lua-gateway /push", r["responses_lua"])
            finally:
                stop(g)
        elif who == "nchan" and "post" in which:
            n = Nginx(f"nchan-post-{run}", "nchan.conf")
            try:
                out["nchan_pub"] = wrk_row(
                    rig, n, f"/pub/{CHANNEL}", f"POST nchan /pub run {run}",
                    R.POST_LUA, seconds, conns,
                )  # fmt: skip
            finally:
                stop(n)
    return out


def row_conns(rig: R.Servers, side: Side, cap: int, hold: float, run: int) -> dict[str, Any]:
    """Row 6: as many idle subscribed WebSockets as the server holds, up to `cap`:
    pushd --workers 2 (both workers on CPU 0), Nchan with its one worker. The
    clients stop connecting once none got through for 10 s (wsclient --stall)."""
    name = f"{side.kind}-conns-{run}"
    server: Any
    if side.kind == "pushd":
        server = start_pushd(rig, name, workers=2)
    else:
        server = Nginx(name, "nchan.conf")
    try:
        pids = side.rss_pids(server)
        fds0 = R.settled_fds(pids)
        rss0 = settled_rss(pids, tries=4)
        t0 = time.monotonic()
        clients = R.ClientSet(
            server.port, name, cap, side.ws_path("conns"), idle=True, raw=side.raw, stall=10
        )
        ready = clients.wait_ready()
        connect_s = time.monotonic() - t0
        per_process = [R.open_fds(pid) - f for pid, f in zip(pids, fds0, strict=True)]
        time.sleep(hold)  # then count what is still open
        for child in clients.children:
            child.send("stats")
        reports = [child.json(30) for child in clients.children]
        held = sum(r["open"] for r in reports)
        closed = sum(r["closed_by_server"] for r in reports)
        rss1 = settled_rss(pids)
        server.alive()
        out = {
            "cap": cap,
            "ready": ready,
            "held": held,
            "closed_by_server": closed,
            "connect_s": connect_s,
            "connections_per_worker": per_process,
            "fds_per_worker": [R.open_fds(pid) for pid in pids],
            "rss_before_kib": rss0,
            "rss_held_kib": rss1,
            "rss_per_worker_kib": [R.rss_kib(pid) for pid in pids],
            "kib_per_connection": (rss1 - rss0) / held if held else float("nan"),
        }
        if isinstance(server, Nginx):
            out["master_rss_kib"] = R.rss_kib(server.pid)
        else:
            out["parent_rss_kib"] = R.rss_kib(server.pid)
        clients.quit()
        split = " / ".join(f"{c:,}" for c in per_process)
        say(
            f"conns ({side.kind}, run {run}): {held:,} of {cap:,} held {hold:g}s after the "
            f"connect phase ({ready:,} subscribed in {connect_s:.0f}s, {closed} closed by the "
            f"server since); per worker (open sockets): {split}; workers' RSS "
            f"{rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB"
        )
        return out
    finally:
        stop(server)


def build_pushclient() -> Path:
    """The shared harness's pushclient (C, WebSocket and SSE), built by
    bench/harness.py's setup_harness() into bench/bin/harness/ when missing or older
    than its source ($BENCH_HARNESS, else ../shared/bench-harness/)."""
    import harness as H  # here, not at the top: bench/harness.py imports this module

    H.setup_harness()
    return H.LINKS / "pushclient"


def row_sse(rig: R.Servers, side: Side, n: int, run: int) -> dict[str, Any]:
    """Row 8: as row 1 with `n` idle SSE subscribers: pushd's /sse?channel=idle,
    Nchan's EventSource subscriber (/sub/idle, Accept: text/event-stream). The
    clients: the shared harness's pushclient --mode hold, SSE_PER_PROCESS
    connections a process, each process from a source address of its own (pushd
    admits 1,000 connections per address by default)."""
    assert PUSHCLIENT is not None
    name = f"{side.kind}-sse-{run}"
    server = side.start(rig, name, sse=True)
    clients: list[R.Child] = []
    try:
        pids = side.rss_pids(server)
        master0 = R.rss_kib(server.pid) if isinstance(server, Nginx) else 0
        rss0 = settled_rss(pids, tries=4)
        url = f"http://127.0.0.1:{server.port}{side.sse_path('idle')}"
        nproc = max(1, math.ceil(n / SSE_PER_PROCESS))
        sizes = [n // nproc + (1 if i < n % nproc else 0) for i in range(nproc)]
        t0 = time.monotonic()
        for i, size in enumerate(sizes):
            argv = [
                str(PUSHCLIENT), "--mode", "hold", "--url", url, "--n", str(size),
                "--src", R.SOURCES.take(1), "--rate", f"{3000 / nproc:g}", "--inflight", "64",
                "--duration", "3600",
            ]  # fmt: skip
            clients.append(R.Child(f"{name}-{i}", argv, R.CLIENT_CPU))
        held = failed = 0
        for c in clients:
            m = c.wait_for(r"all resolved: connected=(\d+) failed=(\d+)", 90 + n / 200)
            held += int(m.group(1))
            failed += int(m.group(2))
        connect_s = time.monotonic() - t0
        if held != n or failed:
            PROBLEMS.append(f"sse ({side.kind}): {held:,} of {n:,} connections subscribed, "
                            f"{failed:,} failed")  # fmt: skip
        wait_subscribed(server, "idle", held)
        rss1 = settled_rss(pids)
        server.alive()
        out = held_figures(server, held, rss0, rss1, connect_s, master0)
        out.update(failed=failed, client_processes=nproc)
        for c in clients:  # pushclient prints its JSON report on SIGTERM
            c.proc.send_signal(signal.SIGTERM)
        reports = [c.json(30) for c in clients]
        closed = sum(r.get("closed_by_peer", 0) for r in reports)
        return report_held(out, f"sse ({side.kind}", run, "SSE connections", closed)
    finally:
        for c in clients:
            c.stop()
        stop(server)


def row_workers(rig: R.Servers, side: Side, subs: int, burst: int, run: int) -> dict[str, Any]:
    """Row 9: both cores, nothing pinned (server, redis-server, wsclient and the
    publisher share them, as bench/harness.py's row 6 and run.py's workers test):
    pushd --workers 2 against Nchan with worker_processes 2; `subs` WebSocket
    subscribers of one channel, a burst of `burst` messages from ONE publisher
    connection (one request in flight)."""
    name = f"{side.kind}-workers-{run}"
    both = R.ALL_CPUS
    pinned = R.Child.pin
    if pinned:
        R.set_affinity(rig.redis.pid, both)
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))  # the publisher
    server = None
    try:
        server = side.start(rig, name, workers=2, cpu=both)
        pids = list(server.server_pids)
        fds0 = R.settled_fds(pids)
        clients = R.ClientSet(server.port, name, subs, side.ws_path(CHANNEL), raw=side.raw,
                              cpu=both)  # fmt: skip
        held = clients.wait_ready()
        clients_check(f"workers ({side.kind})", clients, held, subs)
        wait_subscribed(server, CHANNEL, held)
        spread = [R.open_fds(pid) - f for pid, f in zip(pids, fds0, strict=True)]
        label = f"fan-out {held:,}, 2 workers, 1 publisher ({side.kind}, run {run})"
        b = R.burst_phase(
            rig, clients, label, held, burst, 1, target=server, pinned=False,
            path=side.pub_path(CHANNEL),
        )  # fmt: skip
        b.pop("latency", None)
        b["subscribers"] = held
        b["subscribers_per_worker"] = spread
        if b["missing"] or not post_ok(b["post_status"]):
            PROBLEMS.append(f"{label}: {b['missing']:,} deliveries missing, POST statuses "
                            f"{b['post_status']}")  # fmt: skip
        finals = clients.quit()
        b["closed_by_server"] = sum(r["closed_by_server"] for r in finals)
        if b["closed_by_server"]:
            PROBLEMS.append(f"workers ({side.kind}): the server closed "
                            f"{b['closed_by_server']} subscribers")  # fmt: skip
        each = " + ".join(f"{c:.0f}%" for c in b["server_cpu_percent_each"])
        say(
            f"workers ({side.kind}, run {run}): subscribers per worker (open sockets) "
            f"{' / '.join(f'{c:,}' for c in spread)}; CPU: server {each}, redis "
            f"{b['redis_cpu_percent']:.0f}%, clients {b['client_cpu_percent']:.0f}% (of one CPU)"
        )
        return b
    finally:
        if server is not None:
            stop(server)
        if pinned:
            R.set_affinity(rig.redis.pid, R.SERVER_CPU)
            os.sched_setaffinity(0, {int(R.CLIENT_CPU)})


# ---------------------------------------------------------------- the table


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def get(run: dict[str, Any], *keys: str) -> float | None:
    v: Any = run
    for k in keys:
        if not isinstance(v, dict) or k not in v:
            return None
        v = v[k]
    return v


# (row, label, pushd figure, peer figure, higher is better, format, peer name);
# a figure is a path into one run's results.
Figure = tuple[str, ...]
TABLE: list[tuple[str, str, Figure | None, Figure | None, bool | None, str, str]] = [
    ("idle", "1 RSS per idle WebSocket (KiB)", ("idle", "pushd", "kib_per_connection"),
     ("idle", "nchan", "kib_per_connection"), False, "{:.2f}", "Nchan"),
    ("fanout", f"2 fan-out deliveries/s, max rate, {PUBLISHERS} publisher connections",
     ("fanout", "pushd", "max_rate", "deliveries_per_s"), ("fanout", "nchan", "max_rate",
     "deliveries_per_s"), True, "{:,.0f}", "Nchan"),
    ("fanout", "  server CPU % (max rate)", ("fanout", "pushd", "max_rate",
     "server_cpu_percent"), ("fanout", "nchan", "max_rate", "server_cpu_percent"), None,
     "{:.0f}", "Nchan"),
    ("fanout", "  client CPU us/delivery (max rate)", ("fanout", "pushd", "max_rate",
     "client_cpu_us_per_delivery"), ("fanout", "nchan", "max_rate",
     "client_cpu_us_per_delivery"), None, "{:.2f}", "Nchan"),
    ("latency", "3 fan-out latency p50 (ms)", ("fanout", "pushd", "latency", "p50_ms"),
     ("fanout", "nchan", "latency", "p50_ms"), False, "{:.2f}", "Nchan"),
    ("latency", "3 fan-out latency p99 (ms)", ("fanout", "pushd", "latency", "p99_ms"),
     ("fanout", "nchan", "latency", "p99_ms"), False, "{:.2f}", "Nchan"),
    ("latency", "  server CPU % (paced)", ("fanout", "pushd", "latency",
     "server_cpu_percent"), ("fanout", "nchan", "latency", "server_cpu_percent"), None,
     "{:.0f}", "Nchan"),
    ("latency", "  client CPU us/delivery (paced)", ("fanout", "pushd", "latency",
     "client_cpu_us_per_delivery"), ("fanout", "nchan", "latency",
     "client_cpu_us_per_delivery"), None, "{:.2f}", "Nchan"),
    ("post", "4 POST/s: pushd /channels vs gateway /push", ("post", "pushd_channels",
     "requests_per_s"), ("post", "lua_push", "requests_per_s"), True, "{:,.0f}",
     "nginx+Lua"),
    ("post", "  p99 latency (ms)", ("post", "pushd_channels", "p99_ms"),
     ("post", "lua_push", "p99_ms"), False, "{:.2f}", "nginx+Lua"),
    ("post", "4 POST/s: pushd /push vs gateway /push", ("post", "pushd_push",
     "requests_per_s"), ("post", "lua_push", "requests_per_s"), True, "{:,.0f}",
     "nginx+Lua"),
    ("post", "4 POST/s: pushd /channels vs Nchan /pub", ("post", "pushd_channels",
     "requests_per_s"), ("post", "nchan_pub", "requests_per_s"), True, "{:,.0f}", "Nchan"),
    ("batch", "5 batch msg/s (/publish, 1,000 lines)", ("post", "pushd_batch",
     "messages_per_s"), None, None, "{:,.0f}", DASH),
    ("conns", "6 connections held (cap)", ("conns", "pushd", "held"),
     ("conns", "nchan", "held"), True, "{:,.0f}", "Nchan"),
    ("conns", "  workers' RSS (MiB)", ("conns", "pushd", "rss_held_mib"),
     ("conns", "nchan", "rss_held_mib"), None, "{:,.1f}", "Nchan"),
    ("conns", "  RSS per held connection (KiB)", ("conns", "pushd", "kib_per_connection"),
     ("conns", "nchan", "kib_per_connection"), False, "{:.2f}", "Nchan"),
    ("onepub", "7 fan-out deliveries/s, 1 publisher connection", ("fanout", "pushd",
     "one_publisher", "deliveries_per_s"), ("fanout", "nchan", "one_publisher",
     "deliveries_per_s"), True, "{:,.0f}", "Nchan"),
    ("onepub", "  POSTs/s (1 publisher)", ("fanout", "pushd", "one_publisher",
     "publishes_per_s"), ("fanout", "nchan", "one_publisher", "publishes_per_s"), None,
     "{:,.0f}", "Nchan"),
    ("onepub", "  server CPU % (1 publisher)", ("fanout", "pushd", "one_publisher",
     "server_cpu_percent"), ("fanout", "nchan", "one_publisher", "server_cpu_percent"), None,
     "{:.0f}", "Nchan"),
    ("onepub", "  client CPU us/delivery (1 publisher)", ("fanout", "pushd", "one_publisher",
     "client_cpu_us_per_delivery"), ("fanout", "nchan", "one_publisher",
     "client_cpu_us_per_delivery"), None, "{:.2f}", "Nchan"),
    ("sse", "8 RSS per idle SSE connection (KiB)", ("sse", "pushd", "kib_per_connection"),
     ("sse", "nchan", "kib_per_connection"), False, "{:.2f}", "Nchan"),
    ("workers", "9 fan-out deliveries/s, 2 workers, 1 publisher", ("workers", "pushd",
     "deliveries_per_s"), ("workers", "nchan", "deliveries_per_s"), True, "{:,.0f}",
     "Nchan 2w"),
    ("workers", "  server CPU % of one CPU (2 workers)", ("workers", "pushd",
     "server_cpu_percent"), ("workers", "nchan", "server_cpu_percent"), None, "{:.0f}",
     "Nchan 2w"),
    ("workers", "  clients' CPU % of one CPU (2 workers)", ("workers", "pushd",
     "client_cpu_percent"), ("workers", "nchan", "client_cpu_percent"), None, "{:.0f}",
     "Nchan 2w"),
]  # fmt: skip


def table(results: dict[str, Any], rows: set[str]) -> tuple[str, list[dict[str, Any]]]:
    runs = results["runs"]
    lines: list[tuple[str, ...]] = [
        ("row", "pushd", "peer", "ratio", "runs: pushd | peer")
    ]  # fmt: skip
    summary = []
    for row, label, mine, theirs, higher, fmt, peer in TABLE:
        if row not in rows:
            continue
        a = [v for r in runs if mine and (v := get(r, *mine)) is not None]
        b = [v for r in runs if theirs and (v := get(r, *theirs)) is not None]
        if not a and not b:
            continue
        ma, mb = med(a), med(b)

        def show(v: float, fmt: str = fmt) -> str:
            return DASH if v != v else fmt.format(v)

        ratio = DASH
        value = None
        if a and b and higher is not None:
            value = ma / mb if higher else mb / ma
            if (ma if higher else mb) and (mb if higher else ma):
                ratio = f"{value:.2f} {'pushd/peer' if higher else 'peer/pushd'}"
        runs_text = (
            " ".join(show(v) for v in a) + " | " + (" ".join(show(v) for v in b) if b else DASH)
        )
        lines.append((label, show(ma) if a else DASH, f"{show(mb)} {peer}" if b else DASH,
                      ratio, runs_text))  # fmt: skip
        summary.append({"row": label.strip(), "pushd": ma if a else None,
                        "peer": mb if b else None, "peer_name": peer, "ratio": value,
                        "ratio_is": None if higher is None else
                        ("pushd/peer" if higher else "peer/pushd"),
                        "pushd_runs": a, "peer_runs": b})  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    text = [
        "  ".join(
            cell.ljust(w) if i in (0, 4) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]
    rule = "-" * max(len(t) for t in text)
    return "\n".join([rule, text[0], rule, *text[1:], rule]), summary


# ---------------------------------------------------------------- main


def parse_rows(text: str, ap: argparse.ArgumentParser, names: tuple[str, ...] = ROWS) -> set[str]:
    """`--only`'s rows, by name or number (bench/shards.py's too)."""
    rows = set()
    for item in filter(None, text.split(",")):
        if item.isdigit() and 1 <= int(item) <= len(names):
            rows.add(names[int(item) - 1])
        elif item in names:
            rows.add(item)
        else:
            ap.error(f"unknown row {item!r}; the rows: {','.join(names)} (or 1-{len(names)})")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, help="runs of every row; medians are shown [3; quick 1]")
    ap.add_argument("--quick", action="store_true", help="small counts: a smoke test (~2 min)")
    ap.add_argument(
        "--only", default="", help=f"comma-separated rows: {','.join(ROWS)}, or their numbers 1-9"
    )
    ap.add_argument("--idle", type=int, help="rows 1, 8: idle connections [15000; quick 2000]")
    ap.add_argument(
        "--subscribers", type=int, help="rows 2, 3, 7, 9: subscribers [10000; quick 1000]"
    )
    ap.add_argument(
        "--burst", type=int, help="rows 2, 7, 9: messages of a fan-out burst [100; quick 50]"
    )
    ap.add_argument("--rate", type=float, default=5.0, help="row 3: messages/s [5]")
    ap.add_argument(
        "--latency-seconds", type=float, help="row 3: seconds of paced messages [12; quick 3]"
    )
    ap.add_argument("--wrk-seconds", type=int, help="rows 4-5: each wrk run [5; quick 2]")
    ap.add_argument("--wrk-conns", type=int, default=8, help="rows 4-5: wrk connections [8]")
    ap.add_argument("--cap", type=int, help="row 6: connections tried [30000; quick 3000]")
    ap.add_argument(
        "--hold", type=float, default=3.0, help="row 6: seconds held before counting [3]"
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds to wait in all, before the phases, for other processes to leave the "
        "CPUs [60; quick 0]",
    )
    ap.add_argument(
        "--pushd-src",
        type=Path,
        default=ROOT,
        help="run pushd from this source tree (e.g. a git worktree) [this checkout]",
    )
    args = ap.parse_args()
    global PUSHD_SRC
    PUSHD_SRC = args.pushd_src
    quick = args.quick
    n_runs = args.runs or (1 if quick else 3)
    rows = parse_rows(args.only, ap) or set(ROWS)
    idle_n = args.idle or (2000 if quick else 15000)
    subs = args.subscribers or (1000 if quick else 10000)
    burst = args.burst or (50 if quick else 100)
    lat_s = args.latency_seconds or (3 if quick else 12)
    lat_msgs = max(5, round(args.rate * lat_s))
    wrk_s = args.wrk_seconds or (2 if quick else 5)
    cap = args.cap or (3000 if quick else 30000)
    R.QUIET_WAIT = args.quiet_wait if args.quiet_wait is not None else (0.0 if quick else 60.0)
    R.PUBLISHERS = PUBLISHERS

    hard = R.prepare_driver(("redis-server", "redis-cli", "wrk", "gcc", "taskset", "nginx"))
    for module in ("ngx_nchan_module.so", "ngx_http_lua_module.so", "ndk_http_module.so"):
        if not (NGINX_MODULES / module).exists():
            raise BenchError(f"no {NGINX_MODULES / module}: install libnginx-mod-nchan, "
                             "libnginx-mod-http-lua, libnginx-mod-http-ndk")  # fmt: skip
    if not Path("/usr/share/lua/5.1/nginx/redis.lua").exists():
        raise BenchError("no /usr/share/lua/5.1/nginx/redis.lua: install lua-nginx-redis")
    if (os.cpu_count() or 1) < 2:
        R.Child.pin = False
        say("only one CPU: not pinning servers and clients apart")
    else:
        os.sched_setaffinity(0, {int(R.CLIENT_CPU)})  # the publisher runs here
    shutil.rmtree(OUT, ignore_errors=True)  # the last run's
    RESULTS.unlink(missing_ok=True)
    OUT.mkdir(parents=True)
    R.OUT = OUT  # run.py's children log to bench/out/compare/
    R.build_wsclient()
    if "sse" in rows:
        global PUSHCLIENT
        PUSHCLIENT = build_pushclient()

    results: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "runs_wanted": n_runs,
        "rows": sorted(rows, key=ROWS.index),
        "fd_limit": hard,
        "cpus": os.cpu_count(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "pushd_source": R.describe_source(PUSHD_SRC),
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[0],
        "settings": {
            "idle": idle_n, "subscribers": subs, "burst": burst, "publishers": R.PUBLISHERS,
            "publishers_rows_7_9": 1,
            "rate": args.rate, "latency_messages": lat_msgs, "wrk_seconds": wrk_s,
            "wrk_connections": args.wrk_conns, "cap": cap, "hold_s": args.hold,
        },
        "runs": [],
    }  # fmt: skip
    say(
        f"compare ({results['mode']}, {n_runs} run{'s' if n_runs > 1 else ''}; rows "
        f"{','.join(results['rows'])}): servers + redis on CPU {R.SERVER_CPU}, clients on CPU "
        f"{R.CLIENT_CPU}{' (row 9: nothing pinned)' if 'workers' in rows else ''}; pushd "
        f"{results['pushd_source']}, {results['nginx']}; fd limit {hard}; "
        f"load average {results['loadavg_start']}; logs in {OUT.relative_to(ROOT)}/"
    )
    try:
        rig = R.Servers(PUSHD_SRC, pushd=False)
        say(f"redis-server pid {rig.redis.pid} on 127.0.0.1:{rig.redis_port}")
        for run in range(1, n_runs + 1):
            say(f"--- run {run} of {n_runs}")
            res: dict[str, Any] = {}
            results["runs"].append(res)
            # Who goes first alternates, so a drift of the machine hits both alike.
            sides = [PUSHD, NCHAN] if run % 2 else [NCHAN, PUSHD]
            if "idle" in rows:
                res["idle"] = {s.kind: row_idle(rig, s, idle_n, run) for s in sides}
            if rows & {"fanout", "latency", "onepub"}:
                res["fanout"] = {
                    s.kind: row_fanout(rig, s, subs, burst, args.rate, lat_msgs, rows, run)
                    for s in sides
                }
            if rows & {"post", "batch"}:
                res["post"] = row_post(rig, rows, wrk_s, args.wrk_conns, run)
            if "conns" in rows:
                res["conns"] = {s.kind: row_conns(rig, s, cap, args.hold, run) for s in sides}
                for c in res["conns"].values():
                    c["rss_held_mib"] = c["rss_held_kib"] / 1024
            if "sse" in rows:
                res["sse"] = {s.kind: row_sse(rig, s, idle_n, run) for s in sides}
            if "workers" in rows:
                res["workers"] = {s.kind: row_workers(rig, s, subs, burst, run) for s in sides}
    finally:
        stop_live()
        R.Child.stop_all()
    results["total_s"] = time.monotonic() - R.T0
    text, summary = table(results, rows)
    results["table"] = summary
    results["problems"] = PROBLEMS
    results["other_load"] = R.OTHER_LOAD
    results["client_bound"] = CLIENT_BOUND
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")

    print()
    print(
        f"pushd vs peers ({results['mode']}, median of {n_runs} run{'s' if n_runs > 1 else ''}, "
        f"{results['total_s']:.0f}s; raw figures: {RESULTS.relative_to(ROOT)})"
    )
    print(text)
    notes = [
        "ratio: how many times better pushd is; pushd/peer where higher is better, "
        "peer/pushd where lower is better (below 1: the peer is better)",
    ]
    s = results["settings"]
    if "idle" in rows:
        notes.append(f"row 1: {s['idle']:,} idle WebSockets; RSS of pushd, of Nchan's worker "
                     "(its master's change in compare.json)")  # fmt: skip
    if rows & {"fanout", "latency", "onepub"}:
        notes.append(
            f"rows 2, 3, 7: {s['subscribers']:,} subscribers of one channel (one server and "
            f"set of subscribers for the three); row 2, max rate: {s['burst']} messages from "
            f"{s['publishers']} keep-alive publisher connections; row 7: the same from ONE "
            f"(one request in flight, back to back); row 3, latency: {s['rate']:g} msg/s "
            f"({s['rate'] * s['subscribers']:,.0f} deliveries/s offered) for "
            f"{s['latency_messages'] / s['rate']:g}s, publish -> receive"
        )
    if rows & {"post", "batch"}:
        notes.append(
            f"rows 4-5: wrk -t1 -c{s['wrk_connections']} -d{s['wrk_seconds']}s, 100-byte "
            "body; pushd and the gateway share CPU 0 with redis; Nchan keeps messages in "
            "memory (no Redis)"
        )
    if "batch" in rows:
        notes.append("row 5: pushd only (target >= 100,000 msg/s)")
    if "conns" in rows:
        for run, r in enumerate(results["runs"], 1):
            c = r.get("conns", {}).get("pushd")
            if c:
                split = " / ".join(f"{n:,}" for n in c["connections_per_worker"])
                notes.append(f"row 6, run {run}: pushd --workers 2, connections per worker "
                             f"(open sockets): {split}")  # fmt: skip
        notes.append(
            f"row 6: up to {s['cap']:,} idle WebSockets, counted {s['hold_s']:g}s after the "
            "connect phase; pushd --workers 2 (both on CPU 0) vs Nchan's 1 worker (fd limit "
            "20,000 each)"
        )
    if "sse" in rows:
        notes.append(f"row 8: {s['idle']:,} idle SSE connections (the shared harness's "
                     "pushclient --mode hold); pushd /sse?channel=idle, Nchan's EventSource "
                     "subscriber; RSS as in row 1, a fresh server for each")  # fmt: skip
    if "workers" in rows:
        for run, r in enumerate(results["runs"], 1):
            for kind, w in r.get("workers", {}).items():
                split = " / ".join(f"{n:,}" for n in w["subscribers_per_worker"])
                notes.append(f"row 9, run {run}: {kind} subscribers per worker (open "
                             f"sockets): {split}")  # fmt: skip
        notes.append(
            f"row 9: pushd --workers 2 vs Nchan worker_processes 2, {s['subscribers']:,} "
            f"subscribers x {s['burst']} messages from ONE publisher connection; nothing "
            "pinned: servers, redis-server and the load share both CPUs (CPU % of one CPU)"
        )
    for note in notes:
        print("note: " + note)
    if CLIENT_BOUND:
        print("note: wrk was (nearly) the limit, the server may do more: "
              + "; ".join(CLIENT_BOUND))  # fmt: skip
    if R.OTHER_LOAD:
        print("note: other processes shared the servers' CPU (figures are low): "
              + "; ".join(R.OTHER_LOAD))  # fmt: skip
    if PROBLEMS:
        print("checks FAILED:\n  " + "\n  ".join(PROBLEMS))
        return 1
    print("checks: every connection held, no delivery missing, every POST answered 2xx "
          "(/push: S|..., batches: one result a line)")  # fmt: skip
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        stop_live()
        R.Child.stop_all()
        print("interrupted; all children stopped", file=sys.stderr)
        sys.exit(130)
    except R.BenchError as e:
        stop_live()
        R.Child.stop_all()
        print(f"compare: error: {e}", file=sys.stderr)
        sys.exit(1)
