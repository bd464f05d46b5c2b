"""Log output for machines: `twistd --logger=pushd.logs.json_lines -n pushd ...`
writes one JSON object per event to stdout, with every structured field of the
event (pushd's events carry them: `peer`, `channel`, `code`, `transport`...)."""

from __future__ import annotations

import sys

from twisted.logger import FileLogObserver, jsonFileLogObserver


def json_lines() -> FileLogObserver:
    """A twistd `--logger`: JSON lines on stdout (twistd's `--logfile` is not used)."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
