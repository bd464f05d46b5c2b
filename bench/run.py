#!/usr/bin/env python3
"""pushd benchmarks: idle connections, fan-out, POST/s, batch publishes, 1 vs 2
workers, recovery, the cost of history.

    python bench/run.py [--quick]

Starts its own redis-server and pushd (Redis broker) on free loopback ports,
pinned to CPU 0 (and, for the batch, recovery and history tests, more pushd
processes with their own options, one at a time); the load (bench/bin/wsclient
processes, the publisher in this process, wrk, redis-benchmark) runs on CPU 1.
The workers test pins nothing: its pushd workers, redis and the load share both
CPUs. Prints each figure as it is measured and a table at the end; logs and the
raw figures (results.json) go to bench/out/. See bench/README.md for what each
figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import queue
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WSCLIENT_SRC = BENCH / "wsclient.c"
WSCLIENT = BENCH / "bin" / "wsclient"
POST_LUA = BENCH / "post.lua"
BATCH_LUA = BENCH / "batch.lua"
OUT = BENCH / "out"

SERVER_CPU = "0"
CLIENT_CPU = "1"
ALL_CPUS = f"0-{(os.cpu_count() or 1) - 1}"  # the workers test: nothing pinned
PER_PROCESS = 5000  # connections per wsclient process, at most
# Connections per client source address, at most: pushd admits 1,000 per address
# (--max-connections-per-ip), and the run keeps its default.
PER_ADDRESS = 500
CHANNEL = "bench"
PAD = "x" * 69  # {"t":<16 digits>,"pad":"<69>"} is 100 bytes

T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {text}", flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------- children


class Child:
    """A process of ours: pinned with taskset, killed with its parent (pdeathsig),
    stdout lines kept in a queue (and a log file), stopped by pid at the end."""

    registry: list[Child] = []
    pin = True

    def __init__(
        self,
        name: str,
        argv: list[str],
        cpu: str,
        *,
        control: bool = False,
        merge_stderr: bool = True,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.collect = True
        self.log_path = OUT / f"{name}.log"
        self.log = open(self.log_path, "w", buffering=1)  # noqa: SIM115
        wrap = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []
        if self.pin:
            wrap += ["taskset", "-c", cpu]
        self.proc = subprocess.Popen(
            [*wrap, *argv],
            stdin=subprocess.PIPE if control else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else self.log,
            cwd=cwd or OUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches us only; we stop them in order
            text=True,
            bufsize=1,
        )
        self.pid = self.proc.pid
        Child.registry.append(self)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.startswith("{"):  # reports are long: keep them out of the log
                self.log.write(line)
            if self.collect:
                self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def line(self, timeout: float) -> str:
        """The next stdout line; BenchError on timeout or exit."""
        try:
            line = self.lines.get(timeout=max(timeout, 0.01))
        except queue.Empty:
            raise BenchError(f"{self.name}: nothing on stdout for {timeout:.0f}s") from None
        if line is None:
            self.lines.put(None)
            raise BenchError(f"{self.name} exited (code {self.proc.wait()}); see {self.log_path}")
        return line

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no line matching {pattern!r} in {timeout:.0f}s")
            m = rx.search(self.line(left))
            if m:
                return m

    def wait_all(self, patterns: list[str], timeout: float) -> None:
        """Wait until each pattern matched a line, in any order."""
        deadline = time.monotonic() + timeout
        left = [re.compile(p) for p in patterns]
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                names = ", ".join(repr(rx.pattern) for rx in left)
                raise BenchError(f"{self.name}: no line matching {names} in {timeout:.0f}s")
            line = self.line(remaining)
            left = [rx for rx in left if not rx.search(line)]

    def wait_counts(self, patterns: dict[str, int], timeout: float) -> None:
        """Wait until each pattern matched its number of lines, in any order."""
        deadline = time.monotonic() + timeout
        left = {re.compile(p): n for p, n in patterns.items()}
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                names = ", ".join(f"{rx.pattern!r} x{n}" for rx, n in left.items())
                raise BenchError(f"{self.name}: still waiting for {names} after {timeout:.0f}s")
            line = self.line(remaining)
            for rx in list(left):
                if rx.search(line):
                    left[rx] -= 1
                    if not left[rx]:
                        del left[rx]

    def json(self, timeout: float) -> dict[str, Any]:
        return json.loads(self.wait_for(r"^\{", timeout).string)

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
            except ProcessLookupError:
                pass
        if self in Child.registry:
            Child.registry.remove(self)
        self.log.close()

    @classmethod
    def stop_all(cls) -> None:
        for child in reversed(list(cls.registry)):
            try:
                child.stop()
            except Exception as e:  # keep stopping the others
                print(f"stopping {child.name} (pid {child.pid}): {e}", file=sys.stderr)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# ---------------------------------------------------------------- helpers


def prepare_driver(tools: Sequence[str]) -> int:
    """What a bench driver does first: its `tools` on PATH (BenchError
    otherwise); SIGINT, SIGTERM and SIGHUP stopping every child (explicit, also
    for SIGINT: a shell's background job starts with SIGINT ignored); the hard
    limit of open files as the soft one (children inherit it), which it returns."""
    for tool in tools:
        if not shutil.which(tool):
            raise BenchError(f"{tool} is not installed")
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(pids: list[int], timeout: float = 5.0) -> list[int]:
    """Each process's open descriptors once they stopped changing (the last test's
    connections closed): a baseline to count new connections from."""
    last = [open_fds(pid) for pid in pids]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = [open_fds(pid) for pid in pids]
        if now == last:
            break
        last = now
    return last


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full
    (TcpExt ListenOverflows, all sockets): the client retries its SYN after 1 s."""
    with open("/proc/net/netstat") as f:
        lines = [line.split() for line in f if line.startswith("TcpExt:")]
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if "ListenOverflows" in names:
            return int(values[names.index("ListenOverflows")])
    return 0


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def children_of(pid: int) -> list[int]:
    """The pids whose parent is `pid` (pushd's workers, for its --workers parent)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if ppid == pid:
            found.append(int(entry))
    return sorted(found)


def set_affinity(pid: int, cpus: str) -> None:
    """Pin every thread of a running process (redis-server has several) to `cpus` ("0-1")."""
    lo, _, hi = cpus.partition("-")
    mask = set(range(int(lo), int(hi or lo) + 1))
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), mask)


def own_cpu_seconds() -> float:
    """This process's CPU time (the publisher runs in it), user + system."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_busy_seconds(cpu: str) -> float:
    """Busy time of one CPU from /proc/stat (everything but idle and iowait)."""
    with open("/proc/stat") as f:
        for line in f:
            fields = line.split()
            if fields[0] == f"cpu{cpu}":
                ticks = [int(x) for x in fields[1:]]
                return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK
    return 0.0


def wait_quiet() -> None:
    """Before a CPU-bound phase: wait until neither CPU is busy, so a test suite
    running beside us does not skew the figures (our own processes are idle at
    that point). All the waits of a run together last QUIET_WAIT at most."""
    global QUIET_WAIT
    if QUIET_WAIT <= 0:
        return
    cpus = (SERVER_CPU, CLIENT_CPU) if Child.pin else ("",)
    t0 = time.monotonic()
    while True:
        before = [cpu_busy_seconds(c) for c in cpus]
        time.sleep(0.5)
        busy = [200 * (cpu_busy_seconds(c) - b) for c, b in zip(cpus, before, strict=True)]
        waited = time.monotonic() - t0
        if max(busy) < 10:
            break
        if waited >= QUIET_WAIT:
            load = ", ".join(f"{b:.0f}%" for b in busy)
            say(f"  the CPUs are still busy ({load}); no more waiting in this run")
            break
    QUIET_WAIT -= waited
    if waited > 1:
        say(f"  waited {waited:.0f}s for other processes to leave the CPUs")


TESTS = ("idle", "fanout", "post", "batch", "workers", "recovery", "history")
RECOVERY_PHASES = ("one_at_a_time", "at_once", "at_once_backlog50")
OTHER_LOAD: list[str] = []  # phases where other processes used the server's CPU
QUIET_WAIT = 60.0  # --quiet-wait: what is left of it
PUBLISHERS = 16  # --publishers


class CpuMeter:
    """CPU % of the server and redis over a phase, and of everything else on
    their CPU: other processes there (a test suite, say) make the figures low.

    `server` may be several processes (pushd's workers). `pinned=False` (the
    workers test, where nothing is pinned): "everything else" is the busy time of
    all CPUs less the server, redis, the clients (`percent(clients_s=...)`) and
    this process (the publisher), in % of one CPU."""

    def __init__(self, server: int | list[int], redis: int, *, pinned: bool = True) -> None:
        self.servers = [server] if isinstance(server, int) else list(server)
        self.redis = redis
        self.pinned = pinned and Child.pin
        self.cpu_id = SERVER_CPU if self.pinned else ""
        self.t = time.monotonic()
        self.cpu = [cpu_seconds(p) for p in [*self.servers, redis]]
        self.busy = cpu_busy_seconds(self.cpu_id)
        self.own = own_cpu_seconds()

    def each(self) -> list[float]:
        """CPU seconds of each server process since the start."""
        return [cpu_seconds(p) - c for p, c in zip(self.servers, self.cpu, strict=False)]

    def seconds(self) -> tuple[float, float, float]:
        """CPU seconds of the server and redis since the start, and the wall time."""
        redis = cpu_seconds(self.redis) - self.cpu[-1]
        return sum(self.each()), redis, time.monotonic() - self.t

    def percent(self, phase: str, clients_s: float = 0.0) -> tuple[float, float, float]:
        server_s, redis_s, wall = self.seconds()
        server, redis = 100 * server_s / wall, 100 * redis_s / wall
        busy = 100 * (cpu_busy_seconds(self.cpu_id) - self.busy) / wall
        if not self.pinned:
            busy -= 100 * (clients_s + own_cpu_seconds() - self.own) / wall
        other = max(0.0, busy - server - redis)
        where = f"CPU {SERVER_CPU}" if self.pinned else "the CPUs (% of one CPU)"
        # Ticks are 10 ms: in a short phase a few of them are noise, not another process.
        if Child.pin and other > 10 and other * wall / 100 > 0.05:
            OTHER_LOAD.append(f"{phase}: {other:.0f}%")
            say(f"  warning: other processes used {other:.0f}% of {where} meanwhile")
        return server, redis, other


def build_wsclient() -> None:
    if WSCLIENT.exists() and WSCLIENT.stat().st_mtime >= WSCLIENT_SRC.stat().st_mtime:
        return
    WSCLIENT.parent.mkdir(exist_ok=True)
    cmd = ["gcc", "-O2", "-Wall", "-o", str(WSCLIENT), str(WSCLIENT_SRC)]
    say("compiling: " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def twistd_path() -> str:
    for candidate in (Path(sys.executable).parent / "twistd", ROOT / ".venv" / "bin" / "twistd"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("twistd")
    if not found:
        raise BenchError("no twistd: activate the venv (. .venv/bin/activate)")
    return found


class Sources:
    """Hands out fresh client source addresses 127.0.0.2, 127.0.0.3, ... so no
    two client sets share (source, port) pairs, TIME_WAIT ones included."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> str:
        addrs = []
        for _ in range(n):
            k = self.next
            self.next += 1
            addrs.append(f"127.0.{k // 250}.{2 + k % 250}")
        return ",".join(addrs)


SOURCES = Sources()


# ---------------------------------------------------------------- latency histograms


def bucket_width(lo: int) -> int:
    return 1 if lo < 128 else 1 << (lo.bit_length() - 7)


def merge_latency(reports: list[dict[str, Any]]) -> dict[str, Any]:
    hist: Counter[int] = Counter()
    n = total = 0
    lo_all, hi_all = 2**63, 0
    for r in reports:
        lat = r["lat_us"]
        if not lat["n"]:
            continue
        n += lat["n"]
        total += lat["sum"]
        lo_all = min(lo_all, lat["min"])
        hi_all = max(hi_all, lat["max"])
        for lo, count in lat["hist"]:
            hist[lo] += count
    out: dict[str, Any] = {"n": n}
    if not n:
        return out
    buckets = sorted(hist.items())

    def pct(q: float) -> float:
        rank = q * n
        seen = 0
        for lo, count in buckets:
            seen += count
            if seen >= rank:
                mid = lo + bucket_width(lo) / 2
                return min(max(mid, lo_all), hi_all) / 1000  # ms
        return hi_all / 1000

    out.update(
        mean_ms=total / n / 1000,
        min_ms=lo_all / 1000,
        p50_ms=pct(0.50),
        p90_ms=pct(0.90),
        p99_ms=pct(0.99),
        p999_ms=pct(0.999),
        max_ms=hi_all / 1000,
    )
    return out


# ---------------------------------------------------------------- WebSocket clients


class ClientSet:
    """`total` connections to `path` over ceil(total / per_process) wsclient processes."""

    def __init__(
        self,
        port: int,
        name: str,
        total: int,
        path: str,
        *,
        idle: bool = False,
        per_process: int = PER_PROCESS,
        rate: float = 3000.0,
        cpu: str = CLIENT_CPU,
        raw: bool = False,
        stall: float = 0.0,
        connect_timeout: float | None = None,
    ) -> None:
        """`raw`: a server without pushd's frames (wsclient --raw, for Nchan); `stall`:
        wsclient --stall; `connect_timeout`: wsclient's [60 + total / 200 s]."""
        nproc = max(1, math.ceil(total / per_process))
        sizes = [total // nproc + (1 if i < total % nproc else 0) for i in range(nproc)]
        self.children: list[Child] = []
        self.sizes = sizes
        self.open: list[int] = []
        for i, size in enumerate(sizes):
            argv = [
                str(WSCLIENT),
                "--port", str(port),
                "--path", path,
                "--conns", str(size),
                "--src", SOURCES.take(max(2, math.ceil(size / PER_ADDRESS))),
                "--rate", str(rate / nproc),
                "--inflight", "128",
                "--connect-timeout", str(connect_timeout or 60 + total / 200),
                "--label", f"{name}-{i}",
                "--control",
            ]  # fmt: skip
            if idle:
                argv.append("--idle")
            if raw:
                argv.append("--raw")
            if stall:
                argv += ["--stall", str(stall)]
            self.children.append(Child(f"{name}-{i}", argv, cpu, control=True, merge_stderr=False))

    def wait_ready(self, timeout: float | None = None) -> int:
        timeout = timeout or 90 + sum(self.sizes) / 200
        for child, size in zip(self.children, self.sizes, strict=True):
            m = child.wait_for(r"^ready (\d+) failed (\d+)", timeout)
            self.open.append(int(m.group(1)))
            if int(m.group(2)):
                say(f"  {child.name}: {m.group(2)} of {size} connections failed (see its log)")
        return sum(self.open)

    def expect(self, per_conn: int, idle_ms: int, max_ms: int) -> None:
        """Arm every client to report after per_conn deliveries per open connection."""
        for child, n in zip(self.children, self.open, strict=True):
            child.send(f"expect {n * per_conn} {idle_ms} {max_ms}")
        for child in self.children:
            child.wait_for(r"^armed$", 10)

    def reports(self, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        return [c.json(max(1.0, deadline - time.monotonic())) for c in self.children]

    def quit(self) -> list[dict[str, Any]]:
        for child in self.children:
            child.send("quit")
        finals = [child.json(30) for child in self.children]
        for child in self.children:
            child.stop()
        return finals


# -------------------------------------------------------- publisher (in this process, CPU 1)


def body(t_us: int) -> bytes:
    return b'{"t":%d,"pad":"%s"}' % (t_us, PAD.encode())


async def _request(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    port: int,
    path: str,
    payload: bytes | None = None,
) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a keep-alive connection: POST with a JSON payload, else GET."""
    if payload is None:
        writer.write(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (path.encode(), port))
    else:
        writer.write(
            b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), port, len(payload), payload)
        )
    status = int((await reader.readline()).split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def _post(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    port: int,
    channel: str = CHANNEL,
    path: str | None = None,
) -> int:
    """POST one message to /channels/`channel`, or to `path` (another server's URL)."""
    status, _ = await _request(
        reader, writer, port, path or f"/channels/{channel}", body(time.time_ns() // 1000)
    )
    return status


async def _burst(
    port: int, n: int, nconn: int, channel: str = CHANNEL, path: str | None = None
) -> tuple[float, Counter[int]]:
    statuses: Counter[int] = Counter()
    todo = iter(range(n))
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(nconn)]

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in todo:
            statuses[await _post(reader, writer, port, channel, path)] += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker(r, w) for r, w in conns))
    elapsed = time.monotonic() - t0
    for _, w in conns:
        w.close()
    return elapsed, statuses


async def _paced(
    port: int, n: int, rate: float, nconn: int, path: str | None = None
) -> tuple[float, Counter[int]]:
    statuses: Counter[int] = Counter()
    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(nconn):
        pool.put_nowait(await asyncio.open_connection("127.0.0.1", port))

    async def one() -> None:
        conn = await pool.get()
        try:
            statuses[await _post(*conn, port, path=path)] += 1
        finally:
            pool.put_nowait(conn)

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    tasks = []
    for i in range(n):
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    elapsed = loop.time() - t0
    while not pool.empty():
        pool.get_nowait()[1].close()
    return elapsed, statuses


def publish_burst(
    port: int,
    n: int,
    nconn: int = 4,
    timeout: float = 300,
    channel: str = CHANNEL,
    path: str | None = None,
) -> tuple[float, Counter[int]]:
    return asyncio.run(asyncio.wait_for(_burst(port, n, nconn, channel, path), timeout))


def publish_paced(
    port: int, n: int, rate: float, timeout: float = 300, path: str | None = None
) -> tuple[float, Counter[int]]:
    return asyncio.run(asyncio.wait_for(_paced(port, n, rate, 8, path), timeout))


def publish_ids(port: int, channel: str, n: int) -> list[str]:
    """POST n messages to `channel` one after another; their ids, oldest first."""

    async def go() -> list[str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        ids = []
        try:
            for _ in range(n):
                status, answer = await _request(
                    reader, writer, port, f"/channels/{channel}", body(time.time_ns() // 1000)
                )
                if status != 200:
                    raise BenchError(f"POST /channels/{channel} answered {status}: {answer!r}")
                ids.append(json.loads(answer)["id"])
        finally:
            writer.close()
        return ids

    return asyncio.run(asyncio.wait_for(go(), 60 + n / 100))


def get_json(port: int, path: str) -> Any:
    async def go() -> Any:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            status, answer = await _request(reader, writer, port, path)
        finally:
            writer.close()
        if status != 200:
            raise BenchError(f"GET {path} answered {status}: {answer[:200]!r}")
        return json.loads(answer)

    return asyncio.run(asyncio.wait_for(go(), 30))


def get_status(port: int, path: str) -> int:
    """The status of one GET on a fresh connection (so on any of pushd's workers)."""

    async def go() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return (await _request(reader, writer, port, path))[0]
        finally:
            writer.close()

    return asyncio.run(asyncio.wait_for(go(), 10))


def post_once(port: int) -> int:
    async def go() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await _post(reader, writer, port)
        finally:
            writer.close()

    return asyncio.run(asyncio.wait_for(go(), 10))


# ---------------------------------------------------------------- the servers


def pushd_env(src: Path) -> dict[str, str] | None:
    """The environment that makes twistd import pushd from `src` (another checkout)."""
    if src.resolve() == ROOT:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    return env


def describe_source(src: Path) -> str:
    """`<commit>` or `<commit>+changes` for a git checkout, else the path."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        changed = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(src), "status", "--porcelain",
             "--", "pushd", "twisted"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return str(src)
    if (src / ".git").exists() or src.resolve() == ROOT:
        return f"{commit}+uncommitted changes" if changed else commit
    return str(src)


class Pushd:
    """One pushd process on CPU 0: with the Redis broker (`redis_port`) or the memory one.

    With `workers` > 1, pushd --workers N: a parent holding the listening socket and
    N worker processes (its children) sharing it; `server_pids` are the workers."""

    def __init__(
        self,
        name: str,
        src: Path,
        redis_port: int | None,
        options: list[str] | None = None,
        *,
        backlog: int | None = None,
        cpu: str = SERVER_CPU,
        workers: int = 1,
        port: int | None = None,
        backlog_port: int | None = None,
    ) -> None:
        """`port`, `backlog_port`: these ports, not free ones (a node restarted where it was)."""
        self.port = port or free_port()
        self.broker = "memory" if redis_port is None else "redis"
        self.workers = workers
        argv = [twistd_path(), "-n", "--pidfile=", "pushd",
                "--listen", f"tcp:{self.port}:interface=127.0.0.1"]  # fmt: skip
        ready = [rf"listening on http://127\.0\.0\.1:{self.port}/"]
        if workers > 1:
            # The workers listen on the socket the parent hands them (systemd's way).
            argv += ["--workers", str(workers)]
        # `backlog`: a second listener, on backlog_port, with that listen queue
        # (Twisted's default is 50).
        self.backlog_port = 0
        if backlog is not None:
            self.backlog_port = backlog_port or free_port()
            argv += ["--listen", f"tcp:{self.backlog_port}:interface=127.0.0.1:backlog={backlog}"]
            ready.append(rf"listening on http://127\.0\.0\.1:{self.backlog_port}/")
        if redis_port is not None:
            argv += ["--redis", f"redis://127.0.0.1:{redis_port}"]
            ready.append(r"Redis \S+ connected \(subscriber connection")
        self.child = Child(name, [*argv, *(options or [])], cpu, env=pushd_env(src))
        self.child.wait_counts({rx: workers for rx in ready}, 30)
        self.child.collect = False
        self.pid = self.child.pid
        self.server_pids = [self.pid]
        if workers > 1:
            self.server_pids = children_of(self.pid)
            if len(self.server_pids) != workers:
                raise BenchError(f"{name}: {len(self.server_pids)} workers, not {workers}")
        if redis_port is not None:
            self.wait_healthy(name, 10 * workers)
        status = post_once(self.port)
        if status != 200:
            raise BenchError(f"{name}: a test POST answered {status}")

    def wait_healthy(self, name: str, need: int, timeout: float = 15) -> None:
        """Until `need` GET /health in a row answer 200. "Redis ... connected (subscriber
        connection ...)" comes before pushd's command pool is connected: a POST then answers 503."""
        t0 = time.monotonic()
        ok = unhealthy = 0
        while ok < need:
            if time.monotonic() - t0 > timeout:
                raise BenchError(f"{name}: GET /health still not 200 after {timeout:.0f}s")
            if get_status(self.port, "/health") == 200:
                ok += 1
            else:
                ok = 0
                unhealthy += 1
                time.sleep(0.01)
        self.unhealthy = unhealthy
        if unhealthy:
            say(
                f"  {name}: GET /health answered 503 {unhealthy} times after 'Redis subscriber "
                f"connected' ({1000 * (time.monotonic() - t0):.0f} ms until {need} answered 200)"
            )

    def alive(self) -> None:
        if self.child.proc.poll() is not None:
            raise BenchError(
                f"{self.child.name} died (code {self.child.proc.returncode}); "
                f"see {self.child.log_path}"
            )
        if self.workers > 1 and children_of(self.pid) != self.server_pids:
            raise BenchError(
                f"{self.child.name}: workers {self.server_pids} are now "
                f"{children_of(self.pid)} (one was restarted); see {self.child.log_path}"
            )

    def stop(self) -> None:
        if self.workers == 1:
            self.child.stop()
            return
        # The parent stops its workers (their graceful stop, --shutdown-timeout 10 s);
        # should it be killed before, the workers it leaves are stopped here.
        workers = children_of(self.pid)
        self.child.stop(timeout=20)
        for pid in workers:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    ours = b"twistd" in f.read()
                if state != "Z" and ours:
                    os.kill(pid, signal.SIGKILL)
                    say(f"  {self.child.name}: killed worker {pid}, left by its parent")
            except (FileNotFoundError, ProcessLookupError):
                pass


class Servers:
    """redis-server, and the main pushd on it (not with `pushd=False`: compare.py
    starts its own)."""

    def __init__(self, src: Path = ROOT, *, pushd: bool = True) -> None:
        self.src = src
        self.redis_port = free_port()
        self.redis = Child(
            "redis",
            [
                "redis-server",
                "--port", str(self.redis_port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--loglevel", "notice",
            ],
            SERVER_CPU,
        )  # fmt: skip
        self.redis.wait_for(r"Ready to accept connections", 20)
        self.redis.collect = False
        self.pushd: Child | None = None
        if not pushd:
            return
        self.main = Pushd("pushd", src, self.redis_port)
        self.pushd = self.main.child
        self.pid = self.main.pid
        self.port = self.main.port

    def start_pushd(
        self, name: str, broker: str, options: list[str], backlog: int | None = None
    ) -> Pushd:
        """Another pushd (beside the idle main one) with its own options."""
        redis_port = self.redis_port if broker == "redis" else None
        return Pushd(name, self.src, redis_port, options, backlog=backlog)

    def redis_cli(self, *args: str, stdin: str | None = None, db: int = 0) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.redis_port), "-n", str(db), *args],
            input=stdin, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if out.returncode != 0 or out.stdout.startswith("ERR"):
            raise BenchError(f"redis-cli {' '.join(args)[:80]}: {out.stdout}{out.stderr}")
        return out.stdout.strip()

    def settle(self, baseline_fds: int, timeout: float = 60) -> None:
        """Wait until the server has let go of the last test's connections."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if open_fds(self.pid) <= baseline_fds + 2:
                return
            time.sleep(0.2)
        say(f"  note: server still has {open_fds(self.pid)} fds after {timeout:.0f}s")

    def alive(self) -> None:
        for child in (self.redis, self.pushd):
            if child is not None and child.proc.poll() is not None:
                raise BenchError(
                    f"{child.name} died (code {child.proc.returncode}); see {child.log_path}"
                )


# ---------------------------------------------------------------- the tests


def test_idle(s: Servers, n: int) -> dict[str, Any]:
    say(f"idle: opening {n:,} WebSocket connections (/ws?channel=idle)")
    fds0 = open_fds(s.pid)
    wait_quiet()
    rss0 = rss_kib(s.pid)
    overflows = listen_overflows()
    t0 = time.monotonic()
    clients = ClientSet(s.port, "idle", n, "/ws?channel=idle", idle=True)
    held = clients.wait_ready()
    connect_s = time.monotonic() - t0
    overflows = listen_overflows() - overflows
    # RSS settles once the handshakes' garbage is collected: sample until stable.
    rss1 = rss_kib(s.pid)
    for _ in range(20):
        time.sleep(0.5)
        now = rss_kib(s.pid)
        stable = abs(now - rss1) < 256
        rss1 = now
        if stable:
            break
    fds1 = open_fds(s.pid)
    finals = clients.quit()
    s.settle(fds0)
    time.sleep(0.5)
    rss2 = rss_kib(s.pid)
    dropped = sum(r["closed_by_server"] for r in finals)
    kib = (rss1 - rss0) / held if held else float("nan")
    result = {
        "connections": held,
        "wanted": n,
        "client_processes": len(clients.children),
        "connect_s": connect_s,
        "connects_per_s": held / connect_s if connect_s else 0,
        "rss_before_kib": rss0,
        "rss_held_kib": rss1,
        "rss_after_close_kib": rss2,
        "kib_per_connection": kib,
        "server_fds_held": fds1,
        "closed_by_server": dropped,
        "listen_overflows": overflows,
    }
    say(
        f"idle: {held:,} connections held ({len(clients.children)} processes, "
        f"{held / connect_s:,.0f} connects/s); server RSS {rss0 / 1024:.1f} -> "
        f"{rss1 / 1024:.1f} MiB = {kib:.1f} KiB per connection; "
        f"{rss2 / 1024:.1f} MiB after they closed; {overflows:,} SYNs dropped (listen queue full)"
    )
    return result


def burst_phase(
    s: Servers,
    clients: ClientSet,
    name: str,
    held: int,
    msgs: int,
    publishers: int,
    *,
    target: Pushd | None = None,
    pinned: bool = True,
    channel: str = CHANNEL,
    path: str | None = None,
) -> dict[str, Any]:
    """`msgs` messages back-to-back from `publishers` keep-alive connections, each
    POSTing as soon as its previous POST was answered: the server sets the pace.
    `target`: another pushd than the main one (the workers test, `pinned=False`), or
    another server with `port`, `server_pids` and `alive()` (compare.py's Nchan),
    whose publish URL is `path`."""
    target = target or s.main
    wait_quiet()
    clients.expect(msgs, idle_ms=5000, max_ms=int(60_000 + msgs * held / 20))
    cpu = CpuMeter(target.server_pids, s.redis.pid, pinned=pinned)
    own = own_cpu_seconds()
    start_ns = time.time_ns()
    elapsed, statuses = publish_burst(target.port, msgs, publishers, channel=channel, path=path)
    reps = clients.reports(timeout=90 + msgs * held / 20_000)
    publisher_cpu = own_cpu_seconds() - own
    client_cpu = sum(r["cpu_s"] for r in reps)
    server_cpu, redis_cpu, other_cpu = cpu.percent(name, clients_s=client_cpu)
    wall = cpu.seconds()[2]
    each = [100 * c / wall for c in cpu.each()]
    s.alive()
    target.alive()
    deliveries = sum(r["deliveries"] for r in reps)
    first = min((r["first_ns"] for r in reps if r["deliveries"]), default=0)
    last = max((r["last_ns"] for r in reps if r["deliveries"]), default=0)
    # From the first POST to the last delivery: never flattered by a first
    # delivery that came late (with many publishers pushd dispatches in batches).
    span = (last - start_ns) / 1e9 if deliveries else 0.0
    out = {
        "publishers": publishers,
        "messages": msgs,
        "post_status": dict(statuses),
        "publish_s": elapsed,
        "publishes_per_s": msgs / elapsed,
        "deliveries": deliveries,
        "expected": msgs * held,
        "missing": msgs * held - deliveries,
        "per_conn_min": min(r["per_conn_min"] for r in reps),
        "per_conn_max": max(r["per_conn_max"] for r in reps),
        "span_s": span,
        "deliveries_per_s": deliveries / span if span > 0 else 0,
        "messages_per_s": deliveries / span / held if span > 0 and held else 0,
        "first_to_last_delivery_s": (last - first) / 1e9,
        "deliveries_per_s_first_to_last": deliveries * 1e9 / (last - first) if last > first else 0,
        "client_cpu_s": client_cpu,
        "client_cpu_us_per_delivery": client_cpu * 1e6 / deliveries if deliveries else 0,
        "publisher_cpu_s": publisher_cpu,
        # wsclient + the publisher (this process), in % of one CPU
        "client_cpu_percent": 100 * (client_cpu + publisher_cpu) / wall,
        "server_cpu_percent": server_cpu,
        "server_cpu_percent_each": each,
        "redis_cpu_percent": redis_cpu,
        "other_cpu0_percent" if cpu.pinned else "other_cpu_percent": other_cpu,
        "latency": merge_latency(reps),
    }
    say(
        f"{name} ({publishers} publisher{'s' if publishers > 1 else ''}): {msgs} messages "
        f"published in {elapsed:.2f}s; {deliveries:,} deliveries ({out['missing']:,} missing) "
        f"{span:.2f}s after the first POST = {out['deliveries_per_s']:,.0f} deliveries/s "
        f"({out['messages_per_s']:.1f} msg/s); client {out['client_cpu_us_per_delivery']:.2f} "
        f"CPU us/delivery; server CPU {server_cpu:.0f}%, redis {redis_cpu:.0f}%; latency "
        f"under saturation p50 {out['latency'].get('p50_ms', 0):.0f} ms"
    )
    return out


def latency_line(label: str, rate: float, held: int, lat: dict[str, Any]) -> str:
    """The progress line of a paced (latency) phase."""
    return (
        f"{label} at {rate:g} msg/s ({rate * held:,.0f} deliveries/s offered): "
        f"p50 {lat.get('p50_ms', 0):.2f} ms, p99 {lat.get('p99_ms', 0):.2f} ms, "
        f"max {lat.get('max_ms', 0):.2f} ms over {lat['deliveries']:,} deliveries "
        f"({lat['missing']:,} missing); client {lat['client_cpu_us_per_delivery']:.2f} "
        f"CPU us/delivery; server CPU {lat['server_cpu_percent']:.0f}%"
    )


def test_fanout(
    s: Servers, subs: int, burst_msgs: int, serial_msgs: int, lat_rate: float, lat_msgs: int
) -> dict[str, Any]:
    say(f"fan-out {subs:,}: opening {subs:,} subscribers of channel {CHANNEL!r}")
    fds0 = open_fds(s.pid)
    clients = ClientSet(s.port, f"fanout{subs}", subs, f"/ws?channel={CHANNEL}")
    held = clients.wait_ready()
    result: dict[str, Any] = {"subscribers": held, "wanted": subs}

    # 1. max rate: many publishers (pushd then dispatches messages in batches and
    #    writes several frames per send), then one publisher (one message at a time).
    name = f"fan-out {held:,} max rate"
    result["max_rate"] = burst_phase(s, clients, name, held, burst_msgs, PUBLISHERS)
    result["serial"] = burst_phase(s, clients, name, held, serial_msgs, 1)

    # 2. latency at a moderate rate: lat_msgs messages paced at lat_rate/s.
    wait_quiet()
    clients.expect(lat_msgs, idle_ms=5000, max_ms=int(60_000 + 1000 * lat_msgs / lat_rate))
    cpu = CpuMeter(s.pid, s.redis.pid)
    elapsed, statuses2 = publish_paced(s.port, lat_msgs, lat_rate)
    reps = clients.reports(timeout=90)
    server_cpu, redis_cpu, other_cpu = cpu.percent(f"fan-out {subs} latency")
    s.alive()
    deliveries = sum(r["deliveries"] for r in reps)
    client_cpu = sum(r["cpu_s"] for r in reps)
    result["latency"] = {
        "rate": lat_rate,
        "messages": lat_msgs,
        "publish_s": elapsed,
        "post_status": dict(statuses2),
        "deliveries": deliveries,
        "expected": lat_msgs * held,
        "missing": lat_msgs * held - deliveries,
        "per_conn_min": min(r["per_conn_min"] for r in reps),
        "per_conn_max": max(r["per_conn_max"] for r in reps),
        "client_cpu_us_per_delivery": client_cpu * 1e6 / deliveries if deliveries else 0,
        "server_cpu_percent": server_cpu,
        "redis_cpu_percent": redis_cpu,
        "other_cpu0_percent": other_cpu,
        **merge_latency(reps),
    }
    say(latency_line(f"fan-out {held:,} latency", lat_rate, held, result["latency"]))
    finals = clients.quit()
    result["closed_by_server"] = sum(r["closed_by_server"] for r in finals)
    result["close_codes"] = dict(sum((Counter(r["close_codes"]) for r in finals), Counter()))
    s.settle(fds0)
    return result


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise BenchError(f"wrk latency {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def run_wrk(
    s: Servers,
    target: Pushd,
    path: str,
    label: str,
    *,
    seconds: int,
    threads: int,
    conns: int,
    script: Path = POST_LUA,
    script_args: tuple[str, ...] = (),
    log_name: str = "wrk",
    echo: bool = True,
    cpu: str = CLIENT_CPU,
) -> dict[str, Any]:
    """wrk with `script` against `path` of `target`; its figures, with the CPU of
    pushd (each process), redis and wrk over the run. `echo` prints wrk's output.
    With several pushd workers, also how many of wrk's connections each one holds
    (open descriptors, sampled 1 s into the run)."""
    url = f"http://127.0.0.1:{target.port}{path}"
    args = ["--", *script_args] if script_args else []
    say(
        f"{label}: wrk -t{threads} -c{conns} -d{seconds}s --latency -s "
        f"{script.relative_to(ROOT)} {' '.join([url, *args])}"
    )
    # Before wait_quiet: with a single process, no wait.
    fds0 = settled_fds(target.server_pids) if len(target.server_pids) > 1 else [0]
    wait_quiet()
    cpu_meter = CpuMeter(target.server_pids, s.redis.pid, pinned=cpu != ALL_CPUS)
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency",
            "-s", str(script), url, *args]  # fmt: skip
    spread: list[int] = []
    wrk = Child(log_name, argv, cpu)
    text = []
    t0 = time.monotonic()
    deadline = t0 + seconds + 30
    while True:
        try:
            sampling = len(fds0) > 1 and not spread
            wait = 0.1 if sampling else max(0.01, deadline - time.monotonic())
            line = wrk.lines.get(timeout=wait)
        except queue.Empty:
            if time.monotonic() > deadline:
                raise BenchError(f"{log_name}: wrk still running after {seconds + 30}s") from None
            if sampling and time.monotonic() - t0 >= min(1.0, seconds / 2):
                pids = target.server_pids
                spread = [open_fds(pid) - f for pid, f in zip(pids, fds0, strict=True)]
            continue
        if line is None:  # its stdout closed: it is ending
            break
        text.append(line)
    # Reaped here, with its resource usage: wrk's CPU time.
    _, status, usage = os.wait4(wrk.pid, 0)
    wrk.proc.returncode = code = os.waitstatus_to_exitcode(status)
    client_s = usage.ru_utime + usage.ru_stime
    server_cpu, redis_cpu, other_cpu = cpu_meter.percent(label, clients_s=client_s)
    wall = cpu_meter.seconds()[2]
    each = [100 * c / wall for c in cpu_meter.each()]
    wrk.stop()
    out = "\n".join(text)
    if code != 0:
        raise BenchError(f"wrk exited {code}:\n{out}")
    s.alive()
    target.alive()

    def find(pattern: str, default: str | None = None) -> str:
        m = re.search(pattern, out, re.M)
        if m:
            return m.group(1)
        if default is None:
            raise BenchError(f"no {pattern!r} in wrk's output:\n{out}")
        return default

    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result = {
        "threads": threads,
        "connections": conns,
        "seconds": seconds,
        "requests": int(find(r"^\s*(\d+) requests in")),
        "requests_per_s": float(find(r"^Requests/sec:\s*([\d.]+)")),
        "latency_avg_ms": _ms(find(r"^\s*Latency\s+(\S+)")),
        "latency_max_ms": _ms(find(r"^\s*Latency\s+\S+\s+\S+\s+(\S+)")),
        "p50_ms": _ms(find(r"^\s*50%\s+(\S+)")),
        "p90_ms": _ms(find(r"^\s*90%\s+(\S+)")),
        "p99_ms": _ms(find(r"^\s*99%\s+(\S+)")),
        "non_2xx_3xx_wrk": int(find(r"Non-2xx or 3xx responses:\s*(\d+)", "0")),
        "responses_lua": int(find(r"\w+\.lua: responses=(\d+)")),
        "non_2xx_lua": int(find(r"\w+\.lua: responses=\d+ non2xx=(\d+)")),
        "socket_errors": sum(int(x) for x in errors.groups()) if errors else 0,
        "server_cpu_percent": server_cpu,
        "server_cpu_percent_each": each,
        "connections_per_process": spread,
        "redis_cpu_percent": redis_cpu,
        "client_cpu_percent": 100 * client_s / wall,
        # Of CPU 0 (pinned), or of all CPUs in % of one (the workers test).
        "other_cpu0_percent" if cpu_meter.pinned else "other_cpu_percent": other_cpu,
        "wrk_output": out,
    }
    if echo:
        for line in text:
            print("    " + line, flush=True)
    return result


def test_post(
    s: Servers,
    seconds: int,
    threads: int,
    conns: int,
    *,
    target: Pushd | None = None,
    channel: str = CHANNEL,
    label: str = "POST",
    log_name: str = "wrk",
    echo: bool = True,
) -> dict[str, Any]:
    """wrk POSTs to `channel` of `target` (the main pushd); `echo` prints wrk's output."""
    result = run_wrk(
        s, target or s.main, f"/channels/{channel}", label, seconds=seconds, threads=threads,
        conns=conns, log_name=log_name, echo=echo,
    )  # fmt: skip
    say(
        f"{label}: {result['requests_per_s']:,.0f} requests/s, latency p50 "
        f"{result['p50_ms']:.2f} ms p99 {result['p99_ms']:.2f} ms; non-2xx "
        f"{result['non_2xx_lua']}, socket errors {result['socket_errors']}; server CPU "
        f"{result['server_cpu_percent']:.0f}%, redis {result['redis_cpu_percent']:.0f}%"
    )
    return result


# ---------------------------------------------------------------- batch publishes


BATCH_DATA = {"t": 1732521234567890, "pad": PAD}  # what bench/batch.lua sends, per line


def check_history(p: Pushd, channel: str) -> dict[str, Any]:
    """After a run: GET the channel's last 5 messages, which must be batch.lua's."""
    path = f"/channels/{channel}/history?limit=5"
    try:
        answer = get_json(p.port, path)
    except BenchError as e:
        return {"path": path, "ok": False, "error": str(e)}
    messages = answer.get("messages", [])
    ok = len(messages) == 5 and all(
        m.get("channel") == channel and m.get("data") == BATCH_DATA for m in messages
    )
    return {"path": path, "status": 200, "messages": len(messages), "ok": ok}


def test_batch(
    s: Servers, sizes: list[int], seconds: int, conns: int, post: dict[str, Any] | None
) -> dict[str, Any]:
    """POST /publish with N NDJSON lines a request (bench/batch.lua), wrk -t1 -c`conns`,
    with the Redis broker (the main pushd) and the memory broker (a pushd of its own),
    next to single POSTs from as many connections."""
    result: dict[str, Any] = {"sizes": sizes, "seconds": seconds, "connections": conns}
    brokers = []
    for broker in ("redis", "memory"):
        p = s.main if broker == "redis" else s.start_pushd("pushd-batch-memory", "memory", [])
        try:
            if broker == "memory":
                say(f"batch (memory broker): pushd pid {p.pid} on port {p.port}")
            b: dict[str, Any] = {"broker": broker}
            # Single POSTs: the POST test's figure when it ran (same pushd, -c4), else our own.
            if broker == "redis" and post is not None and post["connections"] == conns:
                b["single"] = {k: v for k, v in post.items() if k != "wrk_output"}
                b["single_from"] = "POST test"
            else:
                b["single"] = test_post(
                    s, seconds, 1, conns, target=p, label=f"batch ({broker}) single POST",
                    log_name=f"wrk-batch-{broker}-single", echo=False,
                )  # fmt: skip
                b["single"].pop("wrk_output")
                b["single_from"] = "own run"
            single = b["single"]["requests_per_s"]
            runs = []
            for n in sizes:
                label = f"batch ({broker}) {n:,} lines"
                r = run_wrk(
                    s, p, "/publish", label, seconds=seconds, threads=1, conns=conns,
                    script=BATCH_LUA, script_args=(str(n), CHANNEL),
                    log_name=f"wrk-batch-{broker}-{n}", echo=False,
                )  # fmt: skip
                m = re.search(r"wrong_count=(\d+) lines=(\d+) body_bytes=(\d+)", r["wrk_output"])
                if not m:
                    raise BenchError(f"{label}: no batch.lua line in wrk's output")
                r.pop("wrk_output")
                r["wrong_count"], r["lines"], r["body_bytes"] = (int(x) for x in m.groups())
                mps = r["requests_per_s"] * n
                r["messages_per_s"] = mps
                r["vs_single"] = mps / single if single else 0.0
                # CPU per message: % of a CPU / messages per second
                r["server_cpu_us_per_message"] = r["server_cpu_percent"] * 1e4 / mps
                r["redis_cpu_us_per_message"] = r["redis_cpu_percent"] * 1e4 / mps
                redis_part = (
                    f", redis {r['redis_cpu_percent']:.0f}% "
                    f"({r['redis_cpu_us_per_message']:.1f} us/msg)"
                    if broker == "redis"
                    else ""
                )
                say(
                    f"{label} ({r['body_bytes'] / 1024:,.0f} KiB a request): "
                    f"{r['requests_per_s']:,.0f} requests/s = {mps:,.0f} messages/s "
                    f"({r['vs_single']:.1f}x single POSTs' {single:,.0f}/s); latency p50 "
                    f"{r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms; non-2xx {r['non_2xx_lua']}, "
                    f"short answers {r['wrong_count']}, socket errors {r['socket_errors']}; "
                    f"server CPU {r['server_cpu_percent']:.0f}% "
                    f"({r['server_cpu_us_per_message']:.1f} us/msg){redis_part}"
                )
                runs.append(r)
            b["runs"] = runs
            b["history"] = check_history(p, CHANNEL)
            h = b["history"]
            say(
                f"batch ({broker}): GET {h['path']}: "
                + (f"200, {h['messages']} messages" if "error" not in h else h["error"])
                + (", batch.lua's data" if h["ok"] else ", NOT what batch.lua sent")
            )
            brokers.append(b)
        finally:
            if p is not s.main:
                p.stop()
    result["brokers"] = brokers
    return result


# ---------------------------------------------------------------- 1 vs 2 workers


def workers_run(
    s: Servers, n: int, subs: int, seconds: int, conns: int, rounds: int, msgs: int
) -> dict[str, Any]:
    """pushd --workers n (1: a plain pushd), unpinned: `rounds` wrk POST runs (each
    with new connections, which the kernel spreads over the workers anew), then a
    burst of `msgs` messages to `subs` WebSocket subscribers."""
    p = Pushd(f"pushd-workers{n}", s.src, s.redis_port, workers=n, cpu=ALL_CPUS)
    try:
        pids = ", ".join(map(str, p.server_pids))
        say(
            f"workers {n}: pushd pid {p.pid} on port {p.port}"
            + (f" (workers {pids})" if n > 1 else "")
        )
        out: dict[str, Any] = {"workers": n, "pids": p.server_pids}
        posts = []
        for k in range(rounds):
            label = f"workers {n}: POST" + (f" {k + 1}/{rounds}" if rounds > 1 else "")
            post = run_wrk(
                s, p, "/channels/workers-post", label, seconds=seconds, threads=2,
                conns=conns, log_name=f"wrk-workers{n}-{k}", echo=False, cpu=ALL_CPUS,
            )  # fmt: skip
            post.pop("wrk_output")
            posts.append(post)
            each = " + ".join(f"{c:.0f}%" for c in post["server_cpu_percent_each"])
            split = " / ".join(map(str, post["connections_per_process"]))
            say(
                f"{label}: {post['requests_per_s']:,.0f} requests/s, latency p50 "
                f"{post['p50_ms']:.2f} ms p99 {post['p99_ms']:.2f} ms; non-2xx "
                f"{post['non_2xx_lua']}, socket errors {post['socket_errors']}; CPU: pushd "
                f"{each}, redis {post['redis_cpu_percent']:.0f}%, wrk "
                f"{post['client_cpu_percent']:.0f}%"
                + (f"; wrk's {conns} connections per worker: {split}" if n > 1 else "")
            )
        out["post_rounds"] = posts
        out["post"] = sorted(posts, key=lambda r: r["requests_per_s"])[len(posts) // 2]

        # Fan-out: subscribers spread over the workers by the kernel (whichever
        # worker accepts first); each message goes through Redis to every worker.
        fds0 = settled_fds(p.server_pids)
        clients = ClientSet(p.port, f"workers{n}-fanout", subs, "/ws?channel=workers-fanout",
                            cpu=ALL_CPUS)  # fmt: skip
        held = clients.wait_ready()
        spread = [open_fds(pid) - f for pid, f in zip(p.server_pids, fds0, strict=True)]
        say(
            f"workers {n}: {held:,} subscribers of 'workers-fanout'"
            + (f", per worker (open sockets): {' / '.join(f'{c:,}' for c in spread)}"
               if n > 1 else "")
        )  # fmt: skip
        fan = burst_phase(
            s, clients, f"workers {n}: fan-out {held:,}", held, msgs, PUBLISHERS,
            target=p, pinned=False, channel="workers-fanout",
        )  # fmt: skip
        fan["subscribers"] = held
        fan["wanted"] = subs
        fan["per_worker"] = spread
        finals = clients.quit()
        fan["closed_by_server"] = sum(r["closed_by_server"] for r in finals)
        each = " + ".join(f"{c:.0f}%" for c in fan["server_cpu_percent_each"])
        say(
            f"workers {n}: fan-out CPU: pushd {each}, redis {fan['redis_cpu_percent']:.0f}%, "
            f"clients {fan['client_cpu_percent']:.0f}% (wsclient "
            f"{fan['client_cpu_us_per_delivery']:.2f} us/delivery + publisher "
            f"{fan['publisher_cpu_s']:.2f}s)"
        )
        out["fanout"] = fan
        return out
    finally:
        p.stop()


def test_workers(
    s: Servers, subs: int, seconds: int, conns: int, rounds: int, msgs: int
) -> dict[str, Any]:
    say(
        "workers: pushd --workers 1 and --workers 2 in turn, nothing pinned: the workers, "
        "redis-server and the load (wrk, wsclient, the publisher) share both CPUs; the "
        "clients' CPU is reported"
    )
    pinned = Child.pin
    if pinned:
        set_affinity(s.redis.pid, ALL_CPUS)
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    try:
        runs = [workers_run(s, n, subs, seconds, conns, rounds, msgs) for n in (1, 2)]
    finally:
        if pinned:
            set_affinity(s.redis.pid, SERVER_CPU)
            os.sched_setaffinity(0, {int(CLIENT_CPU)})
    one, two = runs
    post_ratio = two["post"]["requests_per_s"] / one["post"]["requests_per_s"]
    fan_one, fan_two = one["fanout"]["deliveries_per_s"], two["fanout"]["deliveries_per_s"]
    fan_ratio = fan_two / fan_one if fan_one else 0.0
    # The runs where the kernel gave each worker some of wrk's connections.
    spread = [r["requests_per_s"] for r in two["post_rounds"]
              if min(r["connections_per_process"], default=0) > 0]  # fmt: skip
    best = max(spread, default=0.0)
    say(
        f"workers: POST/s (median of {rounds}) 1: {one['post']['requests_per_s']:,.0f}, 2: "
        f"{two['post']['requests_per_s']:,.0f} ({post_ratio:.2f}x)"
        + (f", best with both workers serving {best:,.0f}" if best else "")
        + f"; fan-out deliveries/s 1: {fan_one:,.0f}, 2: {fan_two:,.0f} ({fan_ratio:.2f}x)"
    )
    return {
        "subscribers": subs,
        "post_seconds": seconds,
        "post_connections": conns,
        "post_rounds": rounds,
        "messages": msgs,
        "runs": runs,
        "post_ratio": post_ratio,
        "post_spread_best": best,
        "fanout_ratio": fan_ratio,
    }


# ---------------------------------------------------------------- recovery


def catchup_phase(
    s: Servers,
    p: Pushd,
    port: int,
    name: str,
    label: str,
    path: str,
    catchup: int,
    conns: int,
    at_once: int,
    rounds: int,
) -> dict[str, Any]:
    """`rounds` wsclient --catchup runs of `conns` clients, `at_once` catching up at a time."""
    wait_quiet()
    deadline = 30 + conns * rounds * 0.5
    overflows = listen_overflows()
    cpu = CpuMeter(p.pid, s.redis.pid)
    reps = []
    for r in range(rounds):
        argv = [
            str(WSCLIENT),
            "--port", str(port),
            "--path", path,
            "--conns", str(conns),
            "--inflight", str(at_once),
            "--rate", "0",
            "--catchup", str(catchup),
            "--src", SOURCES.take(1),
            "--connect-timeout", str(deadline),
            "--label", f"{name}-{r}",
        ]  # fmt: skip
        child = Child(f"{name}-{r}", argv, CLIENT_CPU, merge_stderr=False)
        child.wait_for(r"^done \d+ failed \d+", deadline + 30)
        reps.append(child.json(30))
        child.stop()
    server_s, redis_s, wall = cpu.seconds()
    server_pct, redis_pct, other_pct = cpu.percent(label)
    overflows = listen_overflows() - overflows
    p.alive()
    s.alive()
    cu = [r["catchup"] for r in reps]
    done = sum(c["done"] for c in cu)
    messages = sum(r["deliveries"] for r in reps)
    client_s = sum(r["cpu_s"] for r in reps)
    replay_s = sum(c["wall_s"] for c in cu)  # first connect to last catch-up, per round
    per = 1000 / done if done else 0.0  # ms per catch-up, from seconds
    out = {
        "clients": conns * rounds,
        "at_once": at_once,
        "rounds": rounds,
        "done": done,
        "recovered": sum(c["recovered"] for c in cu),
        "not_recovered": sum(c["not_recovered"] for c in cu),
        "disorder": sum(c["disorder"] for c in cu),
        "extra": sum(c["extra"] for c in cu),
        "bad_id": sum(c["bad_id"] for c in cu),
        "failed": sum(r["failed"] for r in reps),
        "closed_by_server": sum(r["closed_by_server"] for r in reps),
        "close_codes": dict(sum((Counter(r["close_codes"]) for r in reps), Counter())),
        "messages": messages,
        "replay_s": replay_s,
        "messages_per_s": messages / replay_s if replay_s else 0.0,
        "catchups_per_s": done / replay_s if replay_s else 0.0,
        "server_cpu_ms_per_catchup": server_s * per,
        "redis_cpu_ms_per_catchup": redis_s * per,
        "client_cpu_ms_per_catchup": client_s * per,
        "server_cpu_us_per_message": server_s * 1e6 / messages if messages else 0.0,
        "server_cpu_percent": server_pct,
        "redis_cpu_percent": redis_pct,
        "other_cpu0_percent": other_pct,
        "phase_s": wall,
        "listen_overflows": overflows,
        "catchup_ms": merge_latency([{"lat_us": c["done_us"]} for c in cu]),
        "subscribed_ms": merge_latency([{"lat_us": c["subscribed_us"]} for c in cu]),
    }
    lat = out["catchup_ms"]
    redis_part = f", redis {out['redis_cpu_ms_per_catchup']:.2f} ms" if p.broker == "redis" else ""
    say(
        f"{label}: {done:,} of {conns * rounds:,} clients caught up {catchup:,} messages "
        f"(recovered {out['recovered']:,}); per catch-up p50 {lat.get('p50_ms', 0):.1f} ms, "
        f"p99 {lat.get('p99_ms', 0):.1f} ms, max {lat.get('max_ms', 0):.1f} ms; "
        f"{out['messages_per_s']:,.0f} messages/s replayed; CPU per catch-up: server "
        f"{out['server_cpu_ms_per_catchup']:.2f} ms{redis_part}, client "
        f"{out['client_cpu_ms_per_catchup']:.2f} ms; server CPU {server_pct:.0f}%"
        + (f"; {overflows} SYNs dropped (listen queue full)" if overflows else "")
    )
    if out["closed_by_server"]:
        say(
            f"  the server closed {out['closed_by_server']} clients before they had caught up "
            f"(close codes {out['close_codes']}), after {messages:,} messages in all"
        )
    return out


HERD_BACKLOG = 1024


def test_recovery(
    s: Servers, broker: str, catchup: int, seq_n: int, herd_n: int, herd_rounds: int
) -> dict[str, Any]:
    """Clients subscribing with `since` = the first of catchup + 1 messages: each gets
    `catchup` messages replayed from the history (Redis stream or memory)."""
    size = 2 * catchup
    p = s.start_pushd(
        f"pushd-recovery-{broker}", broker, ["--history-size", str(size)], backlog=HERD_BACKLOG
    )
    try:
        channel = f"recovery-{broker}"
        say(
            f"recovery ({broker} broker): pushd pid {p.pid} with --history-size {size}, on port "
            f"{p.port} and {p.backlog_port} (backlog={HERD_BACKLOG}); publishing "
            f"{catchup + 1:,} messages to {channel!r}"
        )
        ids = publish_ids(p.port, channel, catchup + 1)
        since = ids[0]
        limit = min(catchup, 10_000)  # the API's largest limit
        history = get_json(p.port, f"/channels/{channel}/history?since={since}&limit={limit}")
        got = [m["id"] for m in history["messages"]]
        result: dict[str, Any] = {
            "broker": broker,
            "history_size": size,
            "catchup": catchup,
            "since": since,
            "history_ok": got == ids[1 : 1 + limit],
        }
        if not result["history_ok"]:
            say(f"  GET history after {since} answered {len(got)} messages, not the {limit:,}")
        path = f"/ws?channel={channel}&since={since}"
        result["one_at_a_time"] = catchup_phase(
            s, p, p.port, f"recovery-{broker}-seq", f"recovery ({broker}) one at a time",
            path, catchup, seq_n, 1, 1,
        )  # fmt: skip
        # A reconnect storm, where the listen queue holds every connect: the cost of
        # recovery. Then the same on the default listener (Twisted's backlog of 50).
        result["at_once"] = catchup_phase(
            s, p, p.backlog_port, f"recovery-{broker}-herd",
            f"recovery ({broker}) {herd_n} at once (backlog={HERD_BACKLOG})",
            path, catchup, herd_n, herd_n, herd_rounds,
        )  # fmt: skip
        result["at_once_backlog50"] = catchup_phase(
            s, p, p.port, f"recovery-{broker}-herd50",
            f"recovery ({broker}) {herd_n} at once (default backlog 50)",
            path, catchup, herd_n, herd_n, herd_rounds,
        )  # fmt: skip
    finally:
        p.stop()
    return result


# ---------------------------------------------------------------- history cost


# The 7 figures that end a line of redis-benchmark --csv (its test name is not quoted safely).
_CSV_FIGURES = re.compile(",".join([r'"([\d.]+)"'] * 7) + r"\s*$")


def run_to_end(child: Child, timeout: float) -> tuple[int, list[str]]:
    """All of a child's stdout and its exit code."""
    lines = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            lines.append(child.line(deadline - time.monotonic()))
        except BenchError:
            if child.proc.poll() is None:
                raise
            break
    code = child.proc.wait()
    child.stop()
    return code, lines


def publish_script(src: Path) -> str:
    """pushd's PUBLISH Lua script, from the source tree under test."""
    code = (  # pushd.broker.redis.scripts since the broker became a package
        "try:\n from pushd.broker.redis.scripts import PUBLISH\n"
        "except ImportError:\n from pushd.broker.redis import PUBLISH\n"
        "print(PUBLISH.source, end='')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=src, env=pushd_env(src),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if out.returncode != 0:
        raise BenchError(f"cannot read pushd's PUBLISH script: {out.stderr.strip()}")
    return out.stdout


def redis_benchmark(
    s: Servers, name: str, label: str, command: list[str], n: int, pipeline: int, rand: bool
) -> dict[str, Any]:
    """redis-benchmark -c 4 on CPU 1: ops/s, and redis's CPU time per op."""
    argv = ["redis-benchmark", "-p", str(s.redis_port), "-c", "4", "-n", str(n),
            "-P", str(pipeline), "--dbnum", str(BENCH_DB), "--csv"]  # fmt: skip
    if rand:
        argv += ["-r", "1000000000"]  # an int: a larger -r wraps, and every key is 0
    wait_quiet()
    cpu = CpuMeter(s.pid, s.redis.pid)
    code, lines = run_to_end(Child(name, [*argv, *command], CLIENT_CPU), 120)
    _, redis_s, wall = cpu.seconds()
    _, redis_pct, other_pct = cpu.percent(label)
    s.alive()
    m = next((m for m in map(_CSV_FIGURES.search, reversed(lines)) if m), None)
    errors = [line for line in lines if "rror" in line]
    if code != 0 or m is None or errors:
        raise BenchError(f"{name}: redis-benchmark exited {code}: " + "\n".join(lines[-5:]))
    rps, _avg, _lo, p50, _p95, p99, _hi = (float(x) for x in m.groups())
    return {
        "requests": n,
        "pipeline": pipeline,
        "clients": 4,
        "ops_per_s": rps,
        "p50_ms": p50,
        "p99_ms": p99,
        "redis_cpu_us_per_op": redis_s * 1e6 / n,
        "redis_cpu_percent": redis_pct,
        "other_cpu0_percent": other_pct,
        "wall_s": wall,
    }


BENCH_DB = 9  # redis-benchmark's keys go to this db, flushed after the test


def test_history(s: Servers, redis_n: int, post_s: int, sizes: list[int]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    # 1. Redis alone: pushd's PUBLISH script (what a publish with history costs Redis)
    #    vs a plain PUBLISH of the same envelope (what pub/sub alone would cost).
    source = publish_script(s.src)
    sha = s.redis_cli("-x", "SCRIPT", "LOAD", stdin=source)
    if sha != hashlib.sha1(source.encode()).hexdigest():
        raise BenchError(f"SCRIPT LOAD answered {sha!r}")
    channel = "histbench"
    prefix = b'{"type":"message","channel":"%s","id":' % channel.encode()
    data = body(time.time_ns() // 1000).decode()
    stream = f"pushd:{{{channel}}}:history"
    script_args = [f"pushd:{channel}", prefix.decode(), data, "100", "3600", "300"]
    envelope = f'{prefix.decode()}"1732521234567-0","data":{data}}}'
    check = s.redis_cli("EVALSHA", sha, "1", stream, *script_args, db=BENCH_DB)
    if not re.fullmatch(r"0\n\d+-\d+", check):
        raise BenchError(f"EVALSHA of the PUBLISH script answered {check!r}")
    commands = {
        "script": (["EVALSHA", sha, "1", stream, *script_args], False, 3),
        "script_idempotency": (
            ["EVALSHA", sha, "2", stream, "pushd:idempotency:__rand_int__", *script_args],
            True,
            3,
        ),
        "publish": (["PUBLISH", f"pushd:{channel}", envelope], False, 15),
    }
    say(
        f"history: redis-benchmark -c 4 of pushd's PUBLISH script (EVALSHA {sha[:12]}…, "
        f"100-byte data, MAXLEN ~ 100) vs PUBLISH {f'pushd:{channel}'} of the same "
        f"{len(envelope)}-byte envelope (no subscriber)"
    )
    redis: dict[str, Any] = {}
    for key, (command, rand, piped_scale) in commands.items():
        redis[key] = {}
        for pipeline, n in ((1, redis_n), (16, redis_n * piped_scale)):
            r = redis_benchmark(
                s, f"redis-benchmark-{key}-P{pipeline}", f"history redis {key} -P{pipeline}",
                command, n, pipeline, rand,
            )  # fmt: skip
            redis[key][f"P{pipeline}"] = r
        one, piped = redis[key]["P1"], redis[key]["P16"]
        say(
            f"history: redis {key:<18} {one['ops_per_s']:>9,.0f} ops/s (p50 "
            f"{one['p50_ms']:.3f} ms, {one['redis_cpu_us_per_op']:.1f} us redis CPU/op); "
            f"pipelined -P16 {piped['ops_per_s']:>9,.0f} ops/s "
            f"({piped['redis_cpu_us_per_op']:.1f} us redis CPU/op)"
        )
    redis["stream_length"] = int(s.redis_cli("XLEN", stream, db=BENCH_DB))
    # Every idempotency key was new (else the script answered early, and cheaply).
    redis["idempotency_keys"] = int(s.redis_cli("DBSIZE", db=BENCH_DB)) - 1
    idem = sum(r["requests"] for r in redis["script_idempotency"].values())
    if redis["idempotency_keys"] < 0.99 * idem:
        raise BenchError(f"{redis['idempotency_keys']} idempotency keys after {idem} requests")
    s.redis_cli("FLUSHDB", db=BENCH_DB)
    result["redis"] = redis
    script, plain = redis["script"]["P16"], redis["publish"]["P16"]
    say(
        f"history: storing a message costs Redis "
        f"{script['redis_cpu_us_per_op'] - plain['redis_cpu_us_per_op']:.1f} us more than "
        f"publishing it ({script['redis_cpu_us_per_op']:.1f} vs "
        f"{plain['redis_cpu_us_per_op']:.1f} us per op, pipelined)"
    )

    # 2. pushd POST/s with small, default and large histories (each stream starts
    #    full: the steady state of a busy channel), and with the memory broker.
    posts = []
    for broker, size in [*(("redis", n) for n in sizes), ("memory", 100)]:
        p = s.start_pushd(f"pushd-history-{broker}-{size}", broker, ["--history-size", str(size)])
        try:
            channel = f"hist-{broker}-{size}"
            stream = f"pushd:{{{channel}}}:history"
            if broker == "redis":
                s.redis_cli("EVAL", FILL, "1", stream, data, str(size))
            r = test_post(
                s, post_s, 1, 4, target=p, channel=channel,
                label=f"POST --history-size {size} ({broker})",
                log_name=f"wrk-history-{broker}-{size}", echo=False,
            )  # fmt: skip
            r.pop("wrk_output")
            r["broker"] = broker
            r["history_size"] = size
            if broker == "redis":
                r["retained"] = int(s.redis_cli("XLEN", stream))
            else:
                path = f"/channels/{channel}/history?limit=10000"
                r["retained"] = len(get_json(p.port, path)["messages"])
            posts.append(r)
        finally:
            p.stop()
    result["post"] = posts
    say(
        "history: POST/s by --history-size: "
        + "; ".join(
            f"{r['history_size']} ({r['broker']}): {r['requests_per_s']:,.0f} "
            f"[{r['retained']:,} retained]"
            for r in posts
        )
    )
    return result


# A stream of ARGV[2] entries like pushd's: the history of a busy channel.
FILL = """
for i = 1, tonumber(ARGV[2]) do redis.call('XADD', KEYS[1], '*', 'd', ARGV[1], 'p', '') end
return redis.call('XLEN', KEYS[1])
"""


# ---------------------------------------------------------------- main


def problems(results: dict[str, Any]) -> list[str]:
    """What went wrong in the run: the figures are suspect when this is not empty."""
    out = []
    idle = results.get("idle")
    if idle:
        if idle["connections"] < idle["wanted"]:
            out.append(f"idle: only {idle['connections']} of {idle['wanted']} connected")
        if idle["closed_by_server"]:
            out.append(f"idle: the server closed {idle['closed_by_server']} connections")
    for f in results.get("fanout", []):
        name = f"fan-out {f['wanted']}"
        if f["subscribers"] < f["wanted"]:
            out.append(f"{name}: only {f['subscribers']} subscribed")
        for phase in ("max_rate", "serial", "latency"):
            part = f[phase]
            if part["missing"]:
                out.append(f"{name} {phase}: {part['missing']} deliveries missing")
            if part["per_conn_min"] < part["messages"]:
                out.append(f"{name} {phase}: a connection got {part['per_conn_min']} messages only")
            if part["per_conn_max"] > part["messages"]:
                out.append(f"{name} {phase}: a connection got {part['per_conn_max']} (duplicates)")
            bad = {k: v for k, v in part["post_status"].items() if k != 200}
            if bad:
                out.append(f"{name} {phase}: POST answers other than 200: {bad}")
        if f["closed_by_server"]:
            out.append(f"{name}: the server closed {f['closed_by_server']} connections")
    posts = [("POST", results["post"])] if results.get("post") else []
    history = results.get("history")
    if history:
        posts += [(f"POST --history-size {r['history_size']} ({r['broker']})", r)
                  for r in history["post"]]  # fmt: skip
    batch = results.get("batch")
    for b in batch["brokers"] if batch else []:
        name = f"batch ({b['broker']})"
        if b["single_from"] != "POST test":
            posts.append((f"{name} single POST", b["single"]))
        for r in b["runs"]:
            posts.append((f"{name} {r['lines']} lines", r))
            if r["wrong_count"]:
                out.append(f"{name} {r['lines']} lines: {r['wrong_count']} answers without "
                           f"{r['lines']} results")  # fmt: skip
        h = b["history"]
        if not h["ok"]:
            out.append(f"{name}: GET {h['path']}: {h.get('error', 'not the messages sent')}")
    workers = results.get("workers")
    for run in workers["runs"] if workers else []:
        name = f"workers {run['workers']}"
        posts += [(f"{name} POST {k + 1}", r) for k, r in enumerate(run["post_rounds"])]
        fan = run["fanout"]
        if fan["subscribers"] < fan["wanted"]:
            out.append(f"{name}: only {fan['subscribers']} of {fan['wanted']} subscribed")
        if fan["missing"]:
            out.append(f"{name} fan-out: {fan['missing']} deliveries missing")
        if fan["per_conn_min"] < fan["messages"]:
            out.append(f"{name} fan-out: a connection got {fan['per_conn_min']} messages only")
        if fan["per_conn_max"] > fan["messages"]:
            out.append(f"{name} fan-out: a connection got {fan['per_conn_max']} (duplicates)")
        bad = {k: v for k, v in fan["post_status"].items() if k != 200}
        if bad:
            out.append(f"{name} fan-out: POST answers other than 200: {bad}")
        if fan["closed_by_server"]:
            out.append(f"{name}: the server closed {fan['closed_by_server']} connections")
    for name, post in posts:
        if post["non_2xx_lua"] or post["non_2xx_3xx_wrk"]:
            out.append(f"{name}: {post['non_2xx_lua']} non-2xx answers")
        if post["socket_errors"]:
            out.append(f"{name}: {post['socket_errors']} socket errors")
    for rec in results.get("recovery", []):
        name = f"recovery ({rec['broker']})"
        if not rec["history_ok"]:
            out.append(f"{name}: GET history did not answer the {rec['catchup']} messages")
        for phase in RECOVERY_PHASES:
            part = rec[phase]
            if part["done"] < part["clients"]:
                out.append(
                    f"{name} {phase}: {part['done']} of {part['clients']} caught up; the server "
                    f"closed {part['closed_by_server']} (codes {part['close_codes']})"
                )
            if part["not_recovered"]:
                out.append(f"{name} {phase}: {part['not_recovered']} got recovered false")
            for key in ("disorder", "extra", "bad_id"):
                if part[key]:
                    out.append(f"{name} {phase}: {part[key]} messages {key.replace('_', ' ')}")
    return out


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    idle = results.get("idle")
    if idle:
        rows += [
            ("idle connections held", f"{idle['connections']:,} of {idle['wanted']:,}"),
            ("server RSS before / held", f"{idle['rss_before_kib'] / 1024:.1f} / "
             f"{idle['rss_held_kib'] / 1024:.1f} MiB"),
            ("server RSS per idle connection", f"{idle['kib_per_connection']:.1f} KiB"),
            ("connect + subscribe rate", f"{idle['connects_per_s']:,.0f} /s"),
        ]  # fmt: skip
    for f in results.get("fanout", []):
        n = f"{f['subscribers']:,}"
        m, ser, lat = f["max_rate"], f["serial"], f["latency"]
        rows += [
            (f"fan-out {n}: deliveries/s (max)",
             f"{m['deliveries_per_s']:,.0f} = {m['messages_per_s']:.1f} msg/s "
             f"({m['publishers']} publishers)"),
            (f"fan-out {n}: deliveries/s (serial)",
             f"{ser['deliveries_per_s']:,.0f} = {ser['messages_per_s']:.1f} msg/s (1 publisher)"),
            (f"fan-out {n}: latency @ {lat['rate']:g} msg/s",
             f"p50 {lat.get('p50_ms', 0):.2f} ms, p99 {lat.get('p99_ms', 0):.2f} ms, "
             f"max {lat.get('max_ms', 0):.2f} ms"),
            (f"fan-out {n}: client CPU per delivery",
             f"{m['client_cpu_us_per_delivery']:.2f} us max, "
             f"{ser['client_cpu_us_per_delivery']:.2f} us serial, "
             f"{lat['client_cpu_us_per_delivery']:.2f} us paced"),
            (f"fan-out {n}: server CPU (max rate)", f"{m['server_cpu_percent']:.0f}%"),
        ]  # fmt: skip
    post = results.get("post")
    if post:
        rows += [
            ("POST publishes/s (wrk)", f"{post['requests_per_s']:,.0f} "
             f"(-t{post['threads']} -c{post['connections']}, {post['seconds']}s)"),
            ("POST latency", f"p50 {post['p50_ms']:.2f} ms, p99 {post['p99_ms']:.2f} ms"),
            ("POST non-2xx / socket errors", f"{post['non_2xx_lua']} / {post['socket_errors']}"),
        ]  # fmt: skip
    batch = results.get("batch")
    for b in batch["brokers"] if batch else []:
        single = b["single"]
        rows.append(
            (f"batch {b['broker']}: single POSTs",
             f"{single['requests_per_s']:,.0f} msg/s, p50 {single['p50_ms']:.2f} ms, p99 "
             f"{single['p99_ms']:.2f} ms (-c{single['connections']}, {single['seconds']}s"
             + (", POST test)" if b["single_from"] == "POST test" else ")"))
        )  # fmt: skip
        for r in b["runs"]:
            rows.append(
                (f"batch {b['broker']}: {r['lines']:,} lines/request",
                 f"{r['messages_per_s']:,.0f} msg/s = {r['requests_per_s']:,.0f} req/s "
                 f"({r['vs_single']:.1f}x); p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")
            )  # fmt: skip
    if batch:

        def checked(b: dict[str, Any]) -> str:
            h = b["history"]
            got = f"200, {h['messages']} msgs" if "status" in h else "error"
            return (f"{b['broker']} {sum(r['non_2xx_lua'] for r in b['runs'])} / "
                    f"{sum(r['wrong_count'] for r in b['runs'])} / {got}")  # fmt: skip

        rows.append(
            ("batch: non-2xx / short / history",
             ", ".join(checked(b) for b in batch["brokers"]))
        )  # fmt: skip
    workers = results.get("workers")
    if workers:
        one, two = workers["runs"]
        p1, p2 = one["post"], two["post"]
        f1, f2 = one["fanout"], two["fanout"]

        def cpus(part: dict[str, Any]) -> str:
            each = "+".join(f"{c:.0f}" for c in part["server_cpu_percent_each"])
            return (f"{each}% pushd, {part['redis_cpu_percent']:.0f}% redis, "
                    f"{part['client_cpu_percent']:.0f}% client")  # fmt: skip

        n_rounds = workers["post_rounds"]
        by_split = ", ".join(
            f"{'/'.join(map(str, r['connections_per_process']))}: {r['requests_per_s']:,.0f}"
            for r in two["post_rounds"]
        )
        best = workers["post_spread_best"]
        rows += [
            (f"workers 1 vs 2: POST/s (-t2 -c{p1['connections']})",
             f"{p1['requests_per_s']:,.0f} vs {p2['requests_per_s']:,.0f} = "
             f"{workers['post_ratio']:.2f}x"
             + (f" (medians of {n_rounds} runs)" if n_rounds > 1 else "")),
            ("workers 1: POST/s of each run",
             ", ".join(f"{r['requests_per_s']:,.0f}" for r in one["post_rounds"])),
            ("workers 2: POST/s by connections/worker", by_split),
            ("workers 2: POST/s, both workers serving",
             f"best {best:,.0f} = {best / p1['requests_per_s']:.2f}x the 1-worker median"
             if best else "no run: wrk's connections all went to one worker"),
            ("workers 1 vs 2: POST latency",
             f"p50 {p1['p50_ms']:.2f} vs {p2['p50_ms']:.2f} ms, "
             f"p99 {p1['p99_ms']:.2f} vs {p2['p99_ms']:.2f} ms"),
            ("workers 1 vs 2: POST CPU", f"{cpus(p1)} vs {cpus(p2)}"),
            (f"workers 1 vs 2: fan-out {f1['subscribers']:,} deliveries/s",
             f"{f1['deliveries_per_s']:,.0f} vs {f2['deliveries_per_s']:,.0f} = "
             f"{workers['fanout_ratio']:.2f}x ({f1['publishers']} publishers)"),
            ("workers 1 vs 2: fan-out CPU", f"{cpus(f1)} vs {cpus(f2)}"),
            ("workers 2: subscribers per worker", " / ".join(f"{c:,}" for c in f2["per_worker"])),
        ]  # fmt: skip
    for rec in results.get("recovery", []):
        b = rec["broker"]
        for phase in RECOVERY_PHASES:
            part = rec[phase]
            lat = part["catchup_ms"]
            how = {
                "one_at_a_time": "1 at a time",
                "at_once": f"{part['at_once']} at once",
                "at_once_backlog50": f"{part['at_once']} at once, backlog 50",
            }[phase]
            drops = f"; {part['listen_overflows']} SYN drops" if part["listen_overflows"] else ""
            rows.append(
                (f"recovery {b}: {how}",
                 f"p50 {lat.get('p50_ms', 0):.1f} ms, p99 {lat.get('p99_ms', 0):.1f} ms; "
                 f"{part['messages_per_s']:,.0f} msg/s{drops}")
            )  # fmt: skip
        one, herd = rec["one_at_a_time"], rec["at_once"]
        rows.append(
            (f"recovery {b}: server CPU/catch-up",
             f"{one['server_cpu_ms_per_catchup']:.2f} ms (1 at a time), "
             f"{herd['server_cpu_ms_per_catchup']:.2f} ms ({herd['at_once']} at once)")
        )  # fmt: skip
        if b == "redis":
            rows.append(
                ("recovery redis: redis CPU/catch-up",
                 f"{one['redis_cpu_ms_per_catchup']:.2f} ms (1 at a time), "
                 f"{herd['redis_cpu_ms_per_catchup']:.2f} ms ({herd['at_once']} at once)")
            )  # fmt: skip
    history = results.get("history")
    if history:
        names = {"script": "PUBLISH script", "script_idempotency": "script + idem. key",
                 "publish": "plain PUBLISH"}  # fmt: skip
        for key, label in names.items():
            one, piped = history["redis"][key]["P1"], history["redis"][key]["P16"]
            rows.append(
                (f"redis: {label} ops/s",
                 f"{one['ops_per_s']:,.0f} -c4, {piped['ops_per_s']:,.0f} -P16; "
                 f"{piped['redis_cpu_us_per_op']:.1f} us redis CPU/op")
            )  # fmt: skip
        rows.append(
            ("POST/s by --history-size",
             ", ".join(f"{r['history_size']}: {r['requests_per_s']:,.0f}"
                       for r in history["post"] if r["broker"] == "redis")
             + (f" (main POST test, 100: {post['requests_per_s']:,.0f})" if post else ""))
        )  # fmt: skip
        rows += [
            (f"POST/s, memory broker (history {r['history_size']})",
             f"{r['requests_per_s']:,.0f}, p50 {r['p50_ms']:.2f} ms")
            for r in history["post"] if r["broker"] == "memory"
        ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, *lines, rule])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts: a smoke test (~1 minute)")
    ap.add_argument("--idle", type=int, help="idle connections [15000; quick 2000]")
    ap.add_argument(
        "--fanout", type=lambda s: [int(x) for x in s.split(",")],
        help="subscriber counts, comma-separated [1000,10000; quick 200,1000]",
    )  # fmt: skip
    ap.add_argument("--post-seconds", type=int, help="wrk duration [10; quick 3]")
    ap.add_argument(
        "--paced-deliveries",
        type=float,
        default=10_000,
        help="deliveries/s of the paced fan-out latency test [10000]",
    )
    ap.add_argument(
        "--pushd-src",
        type=Path,
        default=ROOT,
        help="run pushd from this source tree (e.g. a git worktree) [this checkout]",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds to wait in all, before the phases, for other processes to leave the "
        "CPUs [60; quick 0]",
    )
    ap.add_argument(
        "--publishers",
        type=int,
        default=16,
        help="keep-alive connections of the max-rate publisher [16]",
    )
    ap.add_argument("--skip", default="", help=f"comma-separated tests to skip: {','.join(TESTS)}")
    ap.add_argument(
        "--only", default="", help="comma-separated tests to run, e.g. recovery,history"
    )
    ap.add_argument(
        "--batch-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        help="lines per POST /publish of the batch test [10,100,1000; quick 10,1000]",
    )
    ap.add_argument(
        "--batch-seconds", type=int, help="wrk duration of each batch size [5; quick 2]"
    )
    ap.add_argument(
        "--workers-subscribers",
        type=int,
        help="WebSocket subscribers of the workers test's fan-out [2000; quick 500]",
    )
    ap.add_argument(
        "--workers-seconds", type=int, help="wrk duration of the workers test's POSTs [5; quick 2]"
    )
    ap.add_argument(
        "--workers-conns",
        type=int,
        default=8,
        help="wrk connections of the workers test's POSTs (2 wrk threads) [8]",
    )
    ap.add_argument(
        "--workers-rounds",
        type=int,
        help="wrk runs of the workers test's POSTs, each with new connections [5; quick 1]",
    )
    ap.add_argument(
        "--catchup", type=int, default=1000, help="messages each recovering client gets [1000]"
    )
    ap.add_argument(
        "--recovery-clients",
        type=int,
        help="clients catching up one after another [200; quick 20]",
    )
    ap.add_argument(
        "--recovery-herd",
        type=lambda s: tuple(int(x) for x in s.split("x")),
        help="clients catching up at once, x rounds [100x5; quick 20x1]",
    )
    ap.add_argument(
        "--history-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        help="--history-size values of the POST/s comparison [1,100,10000; quick 1,10000]",
    )
    ap.add_argument(
        "--redis-requests",
        type=int,
        help="requests per redis-benchmark run, unpipelined (x3 or x15 pipelined) "
        "[100000; quick 10000]",
    )
    args = ap.parse_args()

    quick = args.quick
    global QUIET_WAIT
    QUIET_WAIT = args.quiet_wait if args.quiet_wait is not None else (0.0 if quick else 60.0)
    global PUBLISHERS
    PUBLISHERS = args.publishers
    idle_n = args.idle if args.idle is not None else (2000 if quick else 15000)
    fanouts = args.fanout or ([200, 1000] if quick else [1000, 10000])
    post_s = args.post_seconds or (3 if quick else 10)
    skip = set(filter(None, args.skip.split(",")))
    only = set(filter(None, args.only.split(",")))
    unknown = (skip | only) - set(TESTS)
    if unknown:
        ap.error(f"unknown tests {','.join(sorted(unknown))}; the tests: {','.join(TESTS)}")
    if only:
        skip |= set(TESTS) - only
    catchup = args.catchup
    seq_n = args.recovery_clients or (20 if quick else 200)
    herd_n, herd_rounds = args.recovery_herd or ((20, 1) if quick else (100, 5))
    hist_sizes = args.history_sizes or ([1, 10000] if quick else [1, 100, 10000])
    hist_post_s = 2 if quick else 5
    redis_n = args.redis_requests or (10_000 if quick else 100_000)
    batch_sizes = args.batch_sizes or ([10, 1000] if quick else [10, 100, 1000])
    batch_s = args.batch_seconds or (2 if quick else 5)
    workers_subs = args.workers_subscribers or (500 if quick else 2000)
    workers_s = args.workers_seconds or (2 if quick else 5)
    workers_rounds = args.workers_rounds or (1 if quick else 5)
    # ~2,000,000 deliveries in the workers fan-out burst (100,000 quick)
    workers_msgs = max(20, (100_000 if quick else 2_000_000) // workers_subs)

    # Fan-out parameters per subscriber count. Max rate: ~2M deliveries from
    # --publishers connections, then ~500k from one (a tenth of that in quick mode).
    # Paced: --paced-deliveries per second in all (10 msg/s to 1,000 subscribers,
    # 1 msg/s to 10,000), well under the server's capacity, for 15 s (3 s quick).
    def plan(subs: int) -> tuple[int, int, float, int]:
        scale = 100_000 if quick else 1_000_000
        burst = max(20, min(4000, 2 * scale // subs))
        serial = max(10, min(1000, scale // 2 // subs))
        rate = args.paced_deliveries / subs
        msgs = max(5 if quick else 10, round(rate * (3 if quick else 15)))
        return burst, serial, rate, msgs

    hard = prepare_driver(("redis-server", "redis-cli", "redis-benchmark", "wrk", "gcc", "taskset"))
    if (os.cpu_count() or 1) < 2:
        Child.pin = False
        say("only one CPU: not pinning server and clients apart")
    else:
        os.sched_setaffinity(0, {int(CLIENT_CPU)})  # the publisher runs here
    OUT.mkdir(exist_ok=True)
    for stale in [*OUT.glob("*.log"), OUT / "results.json"]:
        stale.unlink(missing_ok=True)  # the last run's
    build_wsclient()

    results: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "fd_limit": hard,
        "cpus": os.cpu_count(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "pushd_source": describe_source(args.pushd_src),
    }
    say(
        f"pushd benchmark ({results['mode']}): server+redis on CPU {SERVER_CPU}, "
        f"clients on CPU {CLIENT_CPU}; fd limit {hard}; logs in {OUT.relative_to(ROOT)}/"
    )
    results["loadavg_start"] = Path("/proc/loadavg").read_text().split()[0]
    say(f"pushd source: {results['pushd_source']}; load average {results['loadavg_start']}")
    try:
        s = Servers(args.pushd_src)
        say(f"redis-server pid {s.redis.pid} on 127.0.0.1:{s.redis_port}; "
            f"pushd pid {s.pid} on 127.0.0.1:{s.port} (Redis broker)")  # fmt: skip
        if "idle" not in skip:
            results["idle"] = test_idle(s, idle_n)
        if "fanout" not in skip:
            results["fanout"] = []
            for subs in fanouts:
                results["fanout"].append(test_fanout(s, subs, *plan(subs)))
        if "post" not in skip:
            results["post"] = test_post(s, post_s, threads=1, conns=4)
        if "batch" not in skip:
            results["batch"] = test_batch(s, batch_sizes, batch_s, 4, results.get("post"))
        if "workers" not in skip:
            results["workers"] = test_workers(
                s, workers_subs, workers_s, args.workers_conns, workers_rounds, workers_msgs
            )
        if "recovery" not in skip:
            results["recovery"] = [
                test_recovery(s, broker, catchup, seq_n, herd_n, herd_rounds)
                for broker in ("redis", "memory")
            ]
        if "history" not in skip:
            results["history"] = test_history(s, redis_n, hist_post_s, hist_sizes)
        results["pushd_rss_end_kib"] = rss_kib(s.pid)
    finally:
        Child.stop_all()
    results["total_s"] = time.monotonic() - T0
    results["problems"] = problems(results)
    results["other_load"] = OTHER_LOAD
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(f"pushd benchmark results ({results['mode']}, {results['total_s']:.0f}s; "
          f"raw figures: {(OUT / 'results.json').relative_to(ROOT)})")  # fmt: skip
    print(table(results))
    if OTHER_LOAD:
        print(
            "note: other processes shared the server's CPU (figures are low): "
            + "; ".join(OTHER_LOAD)
        )
    if results["problems"]:
        print("checks FAILED:\n  " + "\n  ".join(results["problems"]))
        return 1
    print(
        "checks: every connection held, no delivery missing, every POST answered 2xx "
        "(batches: with one result a line), every catch-up complete and in order"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        Child.stop_all()
        print("interrupted; all children stopped", file=sys.stderr)
        sys.exit(130)
    except BenchError as e:
        Child.stop_all()
        print(f"bench: error: {e}", file=sys.stderr)
        sys.exit(1)
