"""`--workers N`: every core serves.

The parent process opens each `--listen` socket once and starts N workers,
`twistd pushd` processes handed the sockets the way systemd hands them
(LISTEN_FDS and LISTEN_FDNAMES, descriptors from 3 on): each worker listens with a `systemd:`
endpoint, and the kernel spreads connections over them. The workers know
nothing of each other: they coordinate through Redis exactly like separate
nodes. The parent serves nothing itself; it starts a worker again when one
dies, and on stop it asks them all to stop (SIGTERM: their graceful stop).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from pushd.config import (
    OPTIONS,
    URL_OPTIONS,
    WORKER_SECRETS,
    Config,
    ConfigError,
    split_secrets,
)
from pushd.service import ListenFailed, StartupError, with_backlog

log = Logger()

RESTART_DELAY = 1.0

# LISTEN_PID must be the worker's own pid: the shell exports its $$, then execs.
_SHELL = 'export LISTEN_PID=$$; exec "$@"'
_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def open_socket(description: str) -> tuple[socket.socket, str]:
    """A listening socket for a `tcp:` or `unix:` endpoint, and its systemd domain."""
    kind, args, kwargs = endpoints._parseServer(with_backlog(description), None)
    if kind == "TCP":
        interface = kwargs.get("interface", "")
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((interface, int(args[0])))
        domain = "INET6" if family == socket.AF_INET6 else "INET"
    elif kind == "UNIX":
        path = args[0]
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        domain = "UNIX"
    else:
        raise ConfigError(f"--workers: --listen {description!r}: only tcp: and unix: are shared")
    sock.listen(int(kwargs.get("backlog", 50)))
    sock.setblocking(False)
    return sock, domain


def worker_arguments(config: Config, domains: list[str]) -> list[str]:
    """A worker's pushd options: everything given to the parent, but its sockets
    and its secrets (API keys, the token secret, passwords in URLs), which any
    local user could read on a command line: those go in `worker_secrets`."""
    public, _ = split_secrets(config.given)
    args: list[str] = []
    for option in OPTIONS:
        if option.key in ("listen", "workers") or option.name not in public:
            continue
        value = public[option.name]
        for item in value if option.repeatable else [value]:
            args.append(f"--{option.name}={item}")
    for index, domain in enumerate(domains):
        args.append(f"--listen=systemd:domain={domain}:index={index}")
    return args


def worker_secrets(config: Config) -> dict[str, str]:
    """The environment that hands a worker its secrets (pushd.config reads it)."""
    _, secret = split_secrets(config.given)
    return {WORKER_SECRETS: json.dumps(secret)} if secret else {}


def secret_strings(config: Config) -> list[str]:
    """The secrets as they may be spelled on a command line: keys, token secret,
    and the password part of a URL, as typed."""
    _, secret = split_secrets(config.given)
    found: list[str] = []
    for name, value in secret.items():
        for item in value if isinstance(value, list) else [value]:
            if name in URL_OPTIONS:
                password = urlsplit(item).password
                if password:
                    found.append(password)
            else:
                found.append(item)
    return [s for s in found if s]


def mask_command_line(secrets: list[str]) -> bool:
    """Overwrite every secret in this process's own command line (what `ps` and
    /proc/<pid>/cmdline show) with x's, as mysql does with a password given as an
    option. What the operator typed is visible until then: the environment
    (PUSHD_API_KEY, ...) or --config keep secrets off command lines altogether.
    False when /proc does not say where the command line is."""
    try:
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        # after the comm: field 3 (state) is [0]; arg_start and arg_end are 48 and 49
        start, end = int(fields[45]), int(fields[46])
    except (OSError, IndexError, ValueError):
        return False
    if not 0 < start < end:
        return False
    raw = ctypes.string_at(start, end - start)
    masked = raw
    for secret in secrets:
        encoded = secret.encode()
        masked = masked.replace(encoded, b"x" * len(encoded))
    if masked != raw:
        ctypes.memmove(start, masked, len(masked))
    return True


class _Worker(ProcessProtocol):
    transport: Any

    def __init__(self, pool: WorkerPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)
        self.pool._ended(self)


class WorkerPool(Service):
    def __init__(self, config: Config, reactor: Any) -> None:
        self._config = config
        self._reactor = reactor
        self._sockets: list[socket.socket] = []
        self._domains: list[str] = []
        self.workers: dict[int, _Worker] = {}

    def startService(self) -> None:
        Service.startService(self)
        # The workers' command lines have none; the parent's own loses what it had.
        mask_command_line(secret_strings(self._config))
        for description in self._config.listen:
            try:
                sock, domain = open_socket(description)
            except OSError as e:
                raise ListenFailed(description, e) from None
            except ConfigError as e:
                raise StartupError(str(e)) from None
            self._sockets.append(sock)
            self._domains.append(domain)
        log.info(
            "pushd: {n} workers serving {listen}",
            n=self._config.workers,
            listen=", ".join(self._config.listen),
        )
        for number in range(self._config.workers):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        worker = _Worker(self, number)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("LISTEN_") and k != WORKER_SECRETS
        }
        env.update(worker_secrets(self._config))
        names = ":".join(f"listen{n}" for n in range(len(self._sockets)))
        # Twisted wants as many names as descriptors, as systemd >= 227 gives.
        env.update(LISTEN_FDS=str(len(self._sockets)), LISTEN_FDNAMES=names, PUSHD_WORKERS="1")
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        for index, sock in enumerate(self._sockets):
            child_fds[3 + index] = sock.fileno()
        argv = [
            "/bin/sh", "-c", _SHELL, "pushd-worker",
            sys.executable, "-c", _TWISTD, "--nodaemon", "--pidfile=",
            "pushd", *worker_arguments(self._config, self._domains),
        ]  # fmt: skip
        self._reactor.spawnProcess(worker, "/bin/sh", argv, env=env, childFDs=child_fds)
        self.workers[number] = worker

    def _ended(self, worker: _Worker) -> None:
        if self.workers.get(worker.number) is not worker:
            return
        del self.workers[worker.number]
        if self.running:
            log.warn("worker {n} ended; starting it again", n=worker.number)
            self._reactor.callLater(RESTART_DELAY, self._respawn, worker.number)

    def _respawn(self, number: int) -> None:
        if self.running and number not in self.workers:
            self._spawn(number)

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        # The parent's copies of the listening sockets go first: held open, they
        # would let the kernel queue connections that no worker will accept
        # once the workers stop listening (each closes its own at SIGTERM).
        for sock in self._sockets:
            sock.close()
        workers = list(self.workers.values())
        for worker in workers:
            worker.transport.signalProcess(signal.SIGTERM)
        # Past their own --shutdown-timeout, they are killed.
        kill = self._reactor.callLater(self._config.shutdown_timeout + 5, self._kill, workers)
        d = DeferredList([w.ended for w in workers])

        def done(result: Any) -> Any:
            if kill.active():
                kill.cancel()
            return result

        return d.addBoth(done)

    def _kill(self, workers: list[_Worker]) -> None:
        for worker in workers:
            if not worker.ended.called:
                worker.transport.signalProcess(signal.SIGKILL)
