"""A newcomer's run of the README, as a CI step, so the README cannot drift from pushd.

The README marks the blocks to run with an HTML comment just before the fence:

    <!-- ci: setup -->      get the code, make and activate a venv
    <!-- ci: run -->        install pushd and run it in the foreground
    <!-- ci: subscribe -->  the one-minute try's subscriber (a second terminal)
    <!-- ci: publish -->    its curl publishes; `# {...}` lines are the output shown
    <!-- ci: prints -->     what the subscriber prints

`setup` and `run` run as one shell (the newcomer's first terminal) in an empty
directory, from a clean environment (no venv, no PUSHD_*), so `python3` and
`pip` are the machine's own; the first line that fails stops it, as it would
stop a newcomer. The try runs in the checkout that made, with its venv active,
as the README's prose asks of the second terminal. What differs from a
newcomer's run: `git clone URL` copies this working tree instead (the URL may
not exist yet, and CI tests the tree it has); pushd listens on a free port
(through PUSHD_LISTEN, which every pushd option reads; the try's
`127.0.0.1:8080` is rewritten to it), since 8080 may be taken on a CI machine;
and the subscriber's output is unbuffered, a pipe here and not a terminal.
The test-suite command is not run: CI runs it anyway, and it would run this
script again.

Usage: python .ci/readme_run.py [README]    (exit status 0: the README works)
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
MARK = re.compile(r"<!--\s*ci:\s*([\w-]+)\s*-->")
NAMES = ("setup", "run", "subscribe", "publish", "prints")
README_ADDRESS = "127.0.0.1:8080"
# pip install . resolves and installs every dependency (from pip's cache when warm).
START_DEADLINE = 180.0
STEP_DEADLINE = 20.0

# The one stand-in: `git clone URL [DIR]` copies the working tree to DIR.
GIT_STAND_IN = """
git() {
    if [ "$1" != clone ] || [ -z "$2" ]; then
        echo "readme_run: only 'git clone URL [DIR]' is stood in for, not: git $*" >&2
        return 1
    fi
    local dest=${3:-$(basename "$2" .git)}
    cp -a "$README_RUN_TREE" "$dest"
}
set -eo pipefail
"""


class Failure(Exception):
    """The README's run went wrong: the message is the one line CI prints."""


def blocks(readme: Path) -> dict[str, str]:
    """The marked fenced blocks' bodies, by mark; each mark exactly once."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    found: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        mark = MARK.fullmatch(line.strip())
        if mark is None:
            continue
        name = mark.group(1)
        where = f"{readme.name}:{number}: <!-- ci: {name} -->"
        if name not in NAMES:
            raise Failure(f"{where}: unknown mark (known: {', '.join(NAMES)})")
        if name in found:
            raise Failure(f"{where}: a second block with this mark")
        start = number  # index of the line after the mark
        while start < len(lines) and not lines[start].strip():
            start += 1
        if start == len(lines) or not lines[start].startswith("```"):
            raise Failure(f"{where}: not followed by a fenced block")
        end = start + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        if end == len(lines):
            raise Failure(f"{where}: the fenced block never closes")
        found[name] = "\n".join(lines[start + 1 : end]) + "\n"
    missing = [name for name in NAMES if name not in found]
    if missing:
        raise Failure(f"{readme.name}: no block marked {', '.join(missing)}")
    if not re.search(r"^\s*git clone \S+", found["setup"], re.MULTILINE):
        raise Failure(f"{readme.name}: the setup block does not say where the code comes from")
    return found


def guarded(block: str, last_unguarded: bool) -> str:
    """block with each command line stopping the shell with its own words when it fails:
    `set -e` does not stop at `git clone URL && cd pushd` when the clone fails. The
    last line of the run block is left as it is: it is pushd, and its status is its own."""
    logical = re.sub(r"\\\n", " ", block).splitlines()
    commands = [line for line in logical if line.strip() and not line.lstrip().startswith("#")]
    out = []
    for number, line in enumerate(commands, 1):
        if "<<" in line:
            raise Failure(f"a here-document in a set-up block is not supported: {line.strip()}")
        if last_unguarded and number == len(commands):
            out.append(line)
        else:
            said = shlex.quote(f"readme_run: this README line failed: {line.strip()}")
            out.append(f"{line} || {{ echo {said} >&2; exit 1; }}")
    return "\n".join(out) + "\n"


def json_values(text: str) -> list[object]:
    """The JSON values printed one after the other (curl -s adds no newline of its own)."""
    decoder, at = json.JSONDecoder(), 0
    values: list[object] = []
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return values
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            raise Failure(f"not JSON where the README shows JSON: {text[at:].strip()!r}") from None
        values.append(value)


def copy_tree(dest: Path) -> None:
    """The working tree as git sees it (tracked and new files, not ignored ones)."""
    try:
        listed = subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ],
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise Failure(f"cannot list the working tree of {ROOT} with git: {e}") from e
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted from the tree is not copied
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def clean_environment(port: int, tree: Path) -> dict[str, str]:
    """The caller's environment without its venv or pushd settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PUSHD_") and key not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    }
    venv = os.environ.get("VIRTUAL_ENV")
    if venv:
        env["PATH"] = os.pathsep.join(
            part
            for part in env.get("PATH", "").split(os.pathsep)
            if Path(part).resolve() != (Path(venv) / "bin").resolve()
        )
    env["PUSHD_LISTEN"] = f"tcp:{port}:interface=127.0.0.1"
    env["README_RUN_TREE"] = str(tree)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start(
    script: str, cwd: Path, env: dict[str, str], log: IO[bytes] | int
) -> subprocess.Popen[bytes]:
    # A session of its own, so that stopping it stops everything the shell started.
    return subprocess.Popen(
        ["bash", "-c", GIT_STAND_IN + script],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STEP_DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def stop_pushd(shell: subprocess.Popen[bytes]) -> int:
    """Stops pushd as an operator does, SIGTERM to pushd alone, and gives its status:
    143 from a shell that waited for it, -15 when the shell made itself pushd (bash
    execs a `-c` script's last command); either says pushd stopped by the signal."""
    try:
        children = Path(f"/proc/{shell.pid}/task/{shell.pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children or [str(shell.pid)]:
        os.kill(int(child), signal.SIGTERM)
    try:
        return shell.wait(timeout=STEP_DEADLINE)
    except subprocess.TimeoutExpired:
        stop(shell)
        raise Failure(f"pushd did not stop within {STEP_DEADLINE:.0f} s of SIGTERM") from None


def tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join("    " + line for line in text)


def wait_for_health(port: int, server: subprocess.Popen[bytes], log: Path) -> dict[str, object]:
    """/health's answer once pushd is up; fails at once when the shell gives up."""
    deadline = time.monotonic() + START_DEADLINE
    url = f"http://127.0.0.1:{port}/health"
    while True:
        if server.poll() is not None:
            raise Failure(
                f"the README's set-up commands ended (status {server.returncode}) "
                f"before pushd answered; their last lines:\n{tail(log)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                health: dict[str, object] = json.load(response)
                return health
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            raise Failure(
                f"pushd did not answer {url} within {START_DEADLINE:.0f} s; "
                f"the set-up's last lines:\n{tail(log)}"
            )
        # Polls a socket nothing else signals on; the deadline bounds the wait.
        time.sleep(0.2)


def lines_of(stream: IO[bytes]) -> queue.Queue[str | None]:
    """A reader thread's lines of stream (None at its end), so reads can have deadlines."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line.decode(errors="replace").rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def next_line(lines: queue.Queue[str | None], what: str) -> str:
    try:
        line = lines.get(timeout=STEP_DEADLINE)
    except queue.Empty:
        raise Failure(
            f"the README's subscriber printed nothing for {STEP_DEADLINE:.0f} s ({what})"
        ) from None
    if line is None:
        raise Failure(f"the README's subscriber ended ({what})")
    return line


def at_port(block: str, name: str, port: int) -> str:
    if README_ADDRESS not in block:
        raise Failure(
            f"the {name} block does not use {README_ADDRESS}, where the README says pushd listens"
        )
    return block.replace(README_ADDRESS, f"127.0.0.1:{port}")


def shown(line: str) -> str:
    """A line of output as the README can show it: message ids vary from run to run."""
    return re.sub(r'"id":"\d+-\d+"', '"id":"<id>"', line.strip())


def try_it(found: dict[str, str], port: int, checkout: Path, env: dict[str, str]) -> None:
    """The one-minute try: the subscriber, the publishes, and what the subscriber prints."""
    activate = ". .venv/bin/activate\n"
    # A terminal's stdout is line-buffered; a pipe's would hold the prints until exit.
    sub_env = dict(env, PYTHONUNBUFFERED="1")
    subscriber = subprocess.Popen(
        [
            "bash",
            "-c",
            "set -eo pipefail\n" + activate + at_port(found["subscribe"], "subscribe", port),
        ],
        cwd=checkout,
        env=sub_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        assert subscriber.stdout is not None
        printed = lines_of(subscriber.stdout)
        expected = [line for line in found["prints"].splitlines() if line.strip()]
        if not expected:
            raise Failure("the prints block is empty")
        # The first line (the subscription's confirmation) says the subscriber is in place.
        got = [next_line(printed, "before subscribing")]

        published = subprocess.run(
            ["bash", "-c", "set -eo pipefail\n" + at_port(found["publish"], "publish", port)],
            cwd=checkout,
            env=env,
            capture_output=True,
            timeout=STEP_DEADLINE,
        )
        output = published.stdout.decode(errors="replace")
        if published.returncode != 0:
            raise Failure(
                f"the publish block failed (status {published.returncode}): "
                f"{output.strip()} {published.stderr.decode(errors='replace').strip()}"
            )
        replies = [
            reply if isinstance(reply, dict) else {"reply": reply} for reply in json_values(output)
        ]
        commands = len(re.findall(r"^\s*curl ", found["publish"], re.MULTILINE))
        if len(replies) != commands:
            raise Failure(f"the publish block's {commands} curls answered: {output.strip()!r}")
        for line, reply in zip(
            re.findall(r"^\s*# (\{.*\})\s*$", found["publish"], re.MULTILINE), replies, strict=False
        ):
            if shown(json.dumps(reply, separators=(",", ":"))) != shown(line):
                raise Failure(f"a publish answered {reply}, the README shows {line}")

        while len(got) < len(expected):
            got.append(next_line(printed, f"after {len(got)} of the {len(expected)} lines shown"))
        for number, (line, want) in enumerate(zip(got, expected, strict=True), 1):
            if shown(line) != shown(want):
                raise Failure(f"the subscriber's line {number} is {line}, the README shows {want}")
        ids = [value.get("id") for value in json_values("\n".join(got)) if isinstance(value, dict)]
        ids = [id_ for id_ in ids if id_ is not None]
        if ids != [reply.get("id") for reply in replies]:
            raise Failure(f"the subscriber got ids {ids}, the publishes answered {replies}")
    finally:
        stop(subscriber)


def main() -> int:
    readme = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "README.md"
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pushd-readme-") as temporary:
        work = Path(temporary)
        tree, home = work / "tree", work / "newcomer"
        home.mkdir()
        server: subprocess.Popen[bytes] | None = None
        try:
            found = blocks(readme)
            copy_tree(tree)
            port = free_port()
            env = clean_environment(port, tree)
            log_path = work / "setup.log"
            with open(log_path, "wb") as log:
                script = guarded(found["setup"], False) + guarded(found["run"], True)
                server = start(script, home, env, log)
                health = wait_for_health(port, server, log_path)
            if health.get("status") != "ok" or health.get("broker") != "memory":
                raise Failure(f"pushd answered /health with {health}, not ok on the memory broker")
            # The clone's directory: the one the setup block made in the empty directory.
            made = [path for path in home.iterdir() if path.is_dir()]
            if len(made) != 1 or not (made[0] / ".venv").is_dir():
                raise Failure(f"the setup block made {made}, not one checkout with a .venv")
            try_it(found, port, made[0], env)
            status = stop_pushd(server)
            if status not in (128 + signal.SIGTERM, -signal.SIGTERM):
                raise Failure(
                    f"pushd stopped with status {status}; its last lines:\n{tail(log_path)}"
                )
        except Failure as failure:
            print(f"readme_run: {failure}", file=sys.stderr)
            return 1
        finally:
            if server is not None:
                stop(server)
    print(f"ok: the README's set-up and one-minute try ({time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
