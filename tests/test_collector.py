"""The cycle collector as twistd's pushd sets it (pushd.collector)."""

from __future__ import annotations

import json
import subprocess
import sys

from pushd import collector

_PROBE = """
import gc, json
from pushd.tap import Options, makeService
before = gc.get_threshold()
options = Options()
options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1"])
makeService(options)
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count()}))
"""


def test_twistd_pushd_sets_the_collector_for_long_lived_connections() -> None:
    """makeService (twistd's, one process) makes full collections rarer and
    freezes what start-up made; the test process itself is left as it is."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert tuple(seen["before"]) == (700, 10, 10)  # CPython's defaults
    assert tuple(seen["after"]) == collector.THRESHOLDS
    assert seen["frozen"] > 10_000  # modules, classes, functions of start-up
