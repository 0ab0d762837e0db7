"""Garbage-collector settings for processes that keep per-account state in memory.

A worker or a replay holds tens of thousands of account states: millions of small, long-lived
lists and dicts. CPython's generational collector re-traverses all of them at every full
collection, which at the default thresholds took about a third of the agent's time in a
micro-benchmark of 20,000 accounts (docs/benchmark.md). The states hold no reference
cycles, so reference counting frees them; cycles come from asyncio and Faust internals,
which are young. So: freeze what start-up built,
and let the older generations be collected rarely.
"""

from __future__ import annotations

import gc

# Net allocations between young collections (default 700). 400,000 rather than 50,000: the
# compiled core allocates faster, and the worker then spent ~5 % of its CPU collecting; four
# alternating sparse runs went 14.3 -> 13.5 s CPU (docs/benchmark.md, session 11).
YOUNG_ALLOCATIONS = 400_000
MIDDLE_EVERY = 20  # young collections per middle one (default 10)
OLD_EVERY = 100  # middle collections per full one (default 10)


def for_long_lived_state() -> None:
    gc.collect()  # what start-up left as garbage (a failed connect's cycles) is not frozen
    gc.freeze()
    gc.set_threshold(YOUNG_ALLOCATIONS, MIDDLE_EVERY, OLD_EVERY)
