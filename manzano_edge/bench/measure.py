"""Timing and memory helpers: warm-up, then N timed runs; median and p90; peak RSS."""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable


def summarize(samples_s: list[float]) -> dict:
    """Median and p90 (nearest-rank) in milliseconds."""
    ordered = sorted(samples_s)
    p90 = ordered[min(len(ordered) - 1, max(0, int(round(0.9 * len(ordered) + 0.5)) - 1))]
    return {"median_ms": statistics.median(ordered) * 1e3, "p90_ms": p90 * 1e3, "runs": len(ordered)}


def time_fn(fn: Callable[[], object], warmup: int, runs: int, setup: Callable[[], object] | None = None) -> dict:
    """Run `fn` warmup times untimed, then `runs` times timed; `setup` runs before each call, untimed."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    samples = []
    for _ in range(max(1, runs)):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return summarize(samples)


def peak_rss_mb() -> float:
    """This process's peak resident set size. Linux: VmHWM, because ru_maxrss survives fork+exec
    and would report the parent's peak; elsewhere ru_maxrss (bytes on macOS)."""
    hwm = _proc_status_mb("VmHWM:")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float | None:
    return _proc_status_mb("VmRSS:")


def _proc_status_mb(field: str) -> float | None:
    try:
        with open(f"/proc/{os.getpid()}/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
