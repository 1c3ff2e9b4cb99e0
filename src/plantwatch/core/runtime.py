"""Process-wide tuning for long-running roles."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

# Young-generation collections every this many (net) allocations instead of CPython's
# 700: above what ingest holds in flight at full load.
GC_GEN0_THRESHOLD = 200_000


def tune_gc() -> None:
    """Collect less often in a server process.

    Ingest keeps every message in flight (parsed, queued, being committed) alive for a
    while: thousands of messages of a few dozen small objects each. A young-generation
    collection walks every such object still alive, at a cache miss each, so with
    CPython's threshold of 700 (or 50,000) the collector re-walked the in-flight
    messages again and again: measured on MQTT-sized messages, it took a quarter of the
    CPU. With a threshold above the in-flight population, young collections become
    rare (one in a 100,000-message run). Objects alive at startup are frozen out of
    collections.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (it comes with uvicorn[standard] on
    Linux and macOS), else asyncio's. Every await that hands work to another task or
    thread costs a trip through the loop; uvloop's trips are several times cheaper,
    which shows in ingest over MQTT and in the point-to-alert latency."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
