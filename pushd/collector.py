"""The cycle collector, set for a server that holds many long-lived connections.

CPython's full collection walks every tracked object with the reactor stopped.
A node holding 10,000 WebSockets tracks about 275,000 objects, and a full
collection of them took 110-190 ms on the bench machine (bench/README.md, "The
cycle collector"); while connections arrive, one ran each time the tracked
objects had grown by a quarter, so a reconnect storm of 10,000 clients sat
through about ten of them. `tune` makes full collections ten times rarer and
takes what start-up made (modules, classes, the configuration: alive until the
process ends) out of every collection. Cycles are still collected, later.
"""

from __future__ import annotations

import gc

#: gc.set_threshold's: CPython's defaults but for the third, 10 (full
#: collections after 100 young-generation ones, not 10).
THRESHOLDS = (700, 10, 100)


def tune() -> None:
    """Call once, after start-up and before serving (twistd's makeService)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
