"""Time the cycle collector of a process started with this directory on
PYTHONPATH and PUSHD_GC_TRACE=1 (twistd -n pushd, say): each SIGUSR2 writes one
line to stderr, the collections so far per generation, their total time in ms,
the objects tracked (frozen ones apart) and the thresholds:

    GCSUM counts [1452, 131, 12] ms [97, 170, 1090] objects 274059 thresholds (700, 10, 10)

Used for bench/README.md's "The cycle collector"."""

import gc
import os
import signal
import sys
import time

if os.environ.get("PUSHD_GC_TRACE"):
    _started = [0.0]
    _ms = [0.0, 0.0, 0.0]
    _count = [0, 0, 0]

    def _timed(phase: str, info: dict) -> None:
        if phase == "start":
            _started[0] = time.perf_counter()
        else:
            _ms[info["generation"]] += (time.perf_counter() - _started[0]) * 1000
            _count[info["generation"]] += 1

    def _report(*_: object) -> None:
        sys.__stderr__.write(
            f"GCSUM counts {_count} ms {[round(x) for x in _ms]} "
            f"objects {len(gc.get_objects())} thresholds {gc.get_threshold()}\n"
        )
        sys.__stderr__.flush()

    gc.callbacks.append(_timed)
    signal.signal(signal.SIGUSR2, _report)
